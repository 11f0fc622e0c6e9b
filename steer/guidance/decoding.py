"""NADO-guided decoding: sample each token from q*(v | x<t) ∝ p(v | x<t) · R(x<t, v).

:class:`NADOLogitsProcessor` adds ``logsigmoid(z)`` from the guidance model to the policy's next-token
logits inside ``model.generate``; temperature / top-p warpers then act on q*. The guidance model keeps
its own KV cache, so each step feeds it one token (``use_cache=False`` recomputes the whole prefix).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, LogitsProcessor

from .model import GuidanceModel
from .sampling import SampleBatch, generate_continuations

__all__ = ["NADOLogitsProcessor", "guided_generate", "guided_sample", "prefix_settled_by", "settled_by"]


class NADOLogitsProcessor(LogitsProcessor):
    """Turns policy logits into q* logits: ``scores + logsigmoid(z_guidance)`` at the last position.

    Args:
        guidance: the trained :class:`GuidanceModel`.
        prompt_attention_mask: ``[N, P]`` attention mask of the (left-padded) prompts passed to ``generate``.
        use_cache: run the guidance model incrementally with its own KV cache.
        settled: optional ``continuation_ids [N, t] -> bool [N]``: rows whose continuation so far already settles
            a monotone constraint (:func:`settled_by`) decode from the model alone, R = 1 being exact there.
    """

    def __init__(
        self,
        guidance: GuidanceModel,
        prompt_attention_mask: Tensor,
        *,
        use_cache: bool = True,
        settled: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.guidance = guidance
        self.prompt_attention_mask = prompt_attention_mask
        self.use_cache = use_cache
        self.settled = settled
        self.cache = None
        self.seen = 0

    def _attention(self, length: int) -> Tensor:
        prompt = self.prompt_attention_mask
        extra = length - prompt.shape[1]
        if extra < 0:
            raise ValueError(
                f"generate passed {length} tokens, fewer than the {prompt.shape[1]}-token prompt mask"
            )
        ones = torch.ones((prompt.shape[0], extra), dtype=prompt.dtype, device=prompt.device)
        return torch.cat([prompt, ones], dim=1)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        length = input_ids.shape[1]
        attention = self._attention(length).to(input_ids.device)
        if not self.use_cache:
            z = self.guidance(input_ids, attention)[:, -1]
        else:
            if self.cache is None or length <= self.seen:  # first step (or a new generate call)
                self.cache, self.seen = DynamicCache(), 0
            z = self.guidance(
                input_ids[:, self.seen :], attention, cache=self.cache, full_input_ids=input_ids
            )[:, -1]
            self.seen = length
        vocab = min(scores.shape[-1], z.shape[-1])
        guided = scores.float().clone()
        bonus = F.logsigmoid(z[:, :vocab].to(guided.device))
        if self.settled is not None and length > self.prompt_attention_mask.shape[1]:
            done = self.settled(input_ids[:, self.prompt_attention_mask.shape[1] :]).to(guided.device)
            bonus = bonus.masked_fill(done[:, None], 0.0)
        guided[:, :vocab] += bonus
        return guided


def prefix_settled_by(constraint, tokenizer) -> Callable[[Sequence[Sequence[int]]], list[bool]]:
    """``token id lists -> [bool]``: which decoded continuations already settle ``constraint`` (a
    :attr:`~steer.constraints.Constraint.monotone` one, e.g. a topic's any-of word list)."""
    if not getattr(constraint, "monotone", False):
        raise ValueError(
            f"{getattr(constraint, 'name', constraint)!r} is not a monotone constraint: no prefix settles it, so "
            "guidance cannot stop once it is satisfied"
        )

    def settled(id_lists: Sequence[Sequence[int]]) -> list[bool]:
        texts = tokenizer.batch_decode([list(map(int, ids)) for ids in id_lists], skip_special_tokens=True)
        return [bool(x) for x in constraint.prefix_satisfied(texts)]

    return settled


def settled_by(constraint, tokenizer) -> Callable[[Tensor], Tensor]:
    """``continuation_ids [N, t] -> bool [N]``: :func:`prefix_settled_by` for the processor's continuation rows."""
    settled = prefix_settled_by(constraint, tokenizer)
    return lambda continuation_ids: torch.tensor(settled(continuation_ids.tolist()), dtype=torch.bool)


def guided_sample(
    model,
    guidance: GuidanceModel,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n_per_prompt: int = 1,
    batch_size: int = 16,
    seed: int | None = None,
    top_k: int = 0,
    use_cache: bool = True,
    settled: Callable[[Tensor], Tensor] | None = None,
) -> SampleBatch:
    """Like :func:`~steer.guidance.sampling.sample_continuations`, but sampling from q*.

    ``seq_log_probs`` are under the (unguided) policy ``model``. ``settled`` (:func:`settled_by`): rows whose
    continuation settles a monotone constraint go on unguided.
    """
    was_training = guidance.training
    guidance.eval()
    try:
        return generate_continuations(
            model,
            tokenizer,
            prompts,
            n_per_prompt=n_per_prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            batch_size=batch_size,
            seed=seed,
            processor_factory=lambda mask: NADOLogitsProcessor(
                guidance, mask, use_cache=use_cache, settled=settled
            ),
        )
    finally:
        guidance.train(was_training)


def guided_generate(
    model,
    guidance: GuidanceModel,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n_per_prompt: int = 1,
    batch_size: int = 16,
    seed: int | None = None,
    settled: Callable[[Tensor], Tensor] | None = None,
) -> list[str]:
    """Decoded continuations sampled token by token from q* (policy logits + ``logsigmoid(z)``); see
    :func:`guided_sample` for ``settled``."""
    return guided_sample(
        model,
        guidance,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        n_per_prompt=n_per_prompt,
        batch_size=batch_size,
        seed=seed,
        settled=settled,
    ).texts
