"""Draw continuations from a causal LM in batches (left padding, KV cache) and label them with a Constraint."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..constraints.base import Constraint, ConstraintScores, hard_labels, soft_labels
from ..models import model_device
from ..progress import chunks, progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "LabelledSamples",
    "SampleBatch",
    "eos_ids",
    "generate_continuations",
    "label_samples",
    "sample_continuations",
    "score_texts",
]


@dataclass
class SampleBatch:
    """Sampled sequences: left-padded prompt in columns ``[0, prompt_length)``, then the continuation.

    ``continuation_mask`` is True on continuation tokens up to and including the first EOS; everything after
    it is padding (``pad_token_id``, attention 0). ``seq_log_probs`` is ``sum_t log p(x_t | x<t)`` over the
    continuation under the sampling model's own (untempered, untruncated) distribution.
    """

    input_ids: Tensor
    attention_mask: Tensor
    continuation_mask: Tensor
    prompt_length: int
    seq_log_probs: Tensor
    prompts: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, indices: Sequence[int] | Tensor) -> SampleBatch:
        """The rows ``indices`` (ints or a bool mask), in that order."""
        index = torch.as_tensor(indices)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"bool selection must have shape ({len(self)},), got {tuple(index.shape)}")
            index = index.nonzero().view(-1)
        index = index.long().view(-1)
        rows = index.tolist()
        return SampleBatch(
            input_ids=self.input_ids[index.to(self.input_ids.device)],
            attention_mask=self.attention_mask[index.to(self.attention_mask.device)],
            continuation_mask=self.continuation_mask[index.to(self.continuation_mask.device)],
            prompt_length=self.prompt_length,
            seq_log_probs=self.seq_log_probs[index.to(self.seq_log_probs.device)],
            prompts=[self.prompts[i] for i in rows] if self.prompts else [],
            texts=[self.texts[i] for i in rows] if self.texts else [],
        )

    @property
    def continuation_lengths(self) -> Tensor:
        """Number of continuation tokens per row (EOS included)."""
        return self.continuation_mask.sum(-1)

    def to(self, device: str | torch.device) -> SampleBatch:
        return SampleBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            continuation_mask=self.continuation_mask.to(device),
            prompt_length=self.prompt_length,
            seq_log_probs=self.seq_log_probs.to(device),
            prompts=list(self.prompts),
            texts=list(self.texts),
        )


@dataclass
class LabelledSamples:
    """Samples the oracle could score, their labels (hard 0/1 or soft) and raw scores."""

    batch: SampleBatch
    labels: Tensor
    scores: Tensor
    num_dropped: int = 0

    def __len__(self) -> int:
        return len(self.batch)


def eos_ids(model, tokenizer) -> list[int]:
    """The ids that end a continuation: the model's ``generation_config.eos_token_id`` (else the tokenizer's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an eos token")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _tokenize_prompts(tokenizer, prompts: Sequence[str], device) -> tuple[Tensor, Tensor]:
    """All prompts left-padded to one width; an empty prompt becomes the BOS (or EOS) token."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if not prompts:
        raise ValueError("prompts is empty")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if any(not ids for ids in encoded):
        if start is None:
            raise ValueError("a prompt is empty and the tokenizer has no BOS/EOS token to start from")
        encoded = [ids or [start] for ids in encoded]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    batch_size: int,
    seed: int | None,
    processor_factory: Callable[[Tensor], object] | None = None,
    desc: str = "sampling",
    disable_tqdm: bool | None = None,
) -> SampleBatch:
    """The sampling loop behind :func:`sample_continuations`, guided decoding and the guidance rounds' seeded
    sampler; ``processor_factory(prompt_attention_mask)`` adds a LogitsProcessor per batch.

    A progress bar (``desc``, counting sequences) runs over the batches unless ``disable_tqdm`` (see
    :func:`steer.progress.progress_disabled`).
    """
    from transformers import LogitsProcessorList

    if n_per_prompt < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"n_per_prompt, max_new_tokens and batch_size must be >= 1, got {n_per_prompt}, {max_new_tokens}, {batch_size}"
        )
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = model_device(model)
    prompt_ids, prompt_mask = _tokenize_prompts(tokenizer, prompts, device)
    prompt_ids = prompt_ids.repeat_interleave(n_per_prompt, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(n_per_prompt, dim=0)
    rows = [p for p in prompts for _ in range(n_per_prompt)]
    eos = eos_ids(model, tokenizer)
    eos_tensor = torch.tensor(eos, device=device)
    pad_id = int(tokenizer.pad_token_id)
    sampling = {
        "do_sample": True,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k),
    }
    if temperature <= 0:  # greedy
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}

    width = prompt_ids.shape[1]
    pieces: list[tuple[Tensor, Tensor, Tensor]] = []
    bar = progress_bar(total=len(rows), desc=desc, unit="seq", disable=disable_tqdm)
    with bar, torch.no_grad(), _eval_mode(model), _seeded(seed, device):
        for start in range(0, len(rows), batch_size):
            ids = prompt_ids[start : start + batch_size]
            mask = prompt_mask[start : start + batch_size]
            first = int(mask.any(0).long().argmax())  # drop columns that are padding in every row
            ids, mask = ids[:, first:], mask[:, first:]
            processors = LogitsProcessorList()
            if processor_factory is not None:
                processors.append(processor_factory(mask))
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos,
                use_cache=True,
                return_dict_in_generate=True,
                output_logits=True,
                logits_processor=processors,
                **sampling,
            )
            new = out.sequences[:, ids.shape[1] :]
            is_eos = torch.isin(new, eos_tensor)
            keep = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
            new = new.masked_fill(~keep, pad_id)
            log_probs = torch.zeros(new.shape[0], dtype=torch.float32, device=device)
            for step, logits in enumerate(out.logits):
                logits = logits.float()
                token_lp = logits.gather(-1, new[:, step : step + 1]).squeeze(-1) - logits.logsumexp(-1)
                log_probs += token_lp.masked_fill(~keep[:, step], 0.0)
            pieces.append((new, keep, log_probs))
            bar.update(ids.shape[0])

    total_new = max(piece[0].shape[1] for piece in pieces)
    n = len(rows)
    input_ids = torch.full((n, width + total_new), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((n, width + total_new), dtype=torch.long, device=device)
    continuation_mask = torch.zeros((n, width + total_new), dtype=torch.bool, device=device)
    input_ids[:, :width] = prompt_ids
    attention_mask[:, :width] = prompt_mask
    seq_log_probs = torch.cat([piece[2] for piece in pieces])
    row = 0
    for new, keep, _ in pieces:
        b, length = new.shape
        input_ids[row : row + b, width : width + length] = new
        attention_mask[row : row + b, width : width + length] = keep.long()
        continuation_mask[row : row + b, width : width + length] = keep
        row += b
    texts = _decode_continuations(tokenizer, input_ids[:, width:], continuation_mask[:, width:], eos_tensor)
    return SampleBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        continuation_mask=continuation_mask,
        prompt_length=width,
        seq_log_probs=seq_log_probs,
        prompts=rows,
        texts=texts,
    )


def _decode_continuations(tokenizer, new: Tensor, keep: Tensor, eos: Tensor) -> list[str]:
    text_tokens = keep & ~torch.isin(new, eos)
    sequences = [row[m].tolist() for row, m in zip(new.cpu(), text_tokens.cpu())]
    return tokenizer.batch_decode(sequences, skip_special_tokens=True)


def sample_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n_per_prompt: int = 1,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int | None = None,
    top_k: int = 0,
    disable_tqdm: bool | None = None,
) -> SampleBatch:
    """Sample ``n_per_prompt`` continuations per prompt with ``model.generate`` (left padding, KV cache).

    Rows are prompt-major (all samples of prompt 0 first). ``temperature <= 0`` decodes greedily. ``seed``
    makes sampling reproducible without touching the global RNG. The model runs in eval mode under
    ``no_grad`` and is put back in its previous mode afterwards. A progress bar runs over the batches
    unless ``disable_tqdm`` (default: :func:`steer.progress.progress_disabled`).
    """
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
        disable_tqdm=disable_tqdm,
    )


def score_texts(
    constraint: Constraint | Callable[[list[str]], Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    desc: str = "scoring",
    disable_tqdm: bool | None = None,
) -> ConstraintScores:
    """``constraint`` on ``texts`` in chunks of ``batch_size`` with a progress bar counting texts.

    A :class:`~steer.constraints.Constraint` masks what its backend could not score (``evaluate``); for a bare
    callable, NaN and values outside [0, 1] are the failures (``valid=False``).
    """
    texts = list(texts)
    probs, valid = [], []
    for chunk in chunks(texts, batch_size, desc=desc, unit="text", disable=disable_tqdm):
        if isinstance(constraint, Constraint):
            scores = constraint.evaluate(chunk)
            probs.append(scores.probs.float().view(-1))
            valid.append(scores.valid.view(-1))
            continue
        values = torch.as_tensor(constraint(list(chunk)), dtype=torch.float32).view(-1)
        if values.numel() != len(chunk):
            raise RuntimeError(f"constraint returned {values.numel()} scores for {len(chunk)} texts")
        probs.append(values)
        valid.append(~torch.isnan(values) & (values >= 0) & (values <= 1))
    if not probs:
        return ConstraintScores(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    return ConstraintScores(torch.cat(probs), torch.cat(valid))


def label_samples(
    batch: SampleBatch,
    constraint: Constraint | Callable[[list[str]], Tensor],
    *,
    label_mode: str = "hard",
    threshold: float = 0.5,
    include_prompt: bool = False,
    batch_size: int = 64,
    desc: str = "labelling",
    disable_tqdm: bool | None = None,
) -> LabelledSamples:
    """Score the continuations (or prompt + continuation) with ``constraint`` and attach labels.

    ``label_mode="hard"``: 1.0 where the score is >= ``threshold``; ``"soft"``: the score itself. Samples the
    oracle could not score (NaN/None/out of range) are dropped and counted in ``num_dropped``. The oracle
    sees ``batch_size`` texts per call, under a progress bar (:func:`score_texts`).
    """
    if label_mode not in ("hard", "soft"):
        raise ValueError(f"label_mode must be 'hard' or 'soft', got {label_mode!r}")
    texts = [p + t for p, t in zip(batch.prompts, batch.texts)] if include_prompt else list(batch.texts)
    evaluated = score_texts(constraint, texts, batch_size=batch_size, desc=desc, disable_tqdm=disable_tqdm)
    probs, valid = evaluated.probs, evaluated.valid
    num_dropped = int((~valid).sum())
    if num_dropped:
        logger.warning(
            "label_samples: dropped %d of %d samples the oracle could not score", num_dropped, len(texts)
        )
    kept = batch.select(valid) if num_dropped else batch
    scores = probs[valid].float()
    labels = hard_labels(scores, threshold) if label_mode == "hard" else soft_labels(scores)
    return LabelledSamples(batch=kept, labels=labels, scores=scores, num_dropped=num_dropped)
