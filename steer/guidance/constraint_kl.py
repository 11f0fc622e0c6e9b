"""The constraint objective of constrained fine-tuning: λ·KL(q* || p_θ) at the positions where it counts.

``log q* = log_softmax(ref + logsigmoid(z))`` with ``ref`` the detached policy (``reference="policy"``) or the
frozen base (``"base"``: the policy with its adapters disabled, or with its frozen reference adapter alone when it
carries one: :func:`steer.models.reference_model`) and ``z`` from :meth:`GuidanceModel.logits`.
:class:`ConstraintKL` takes a training batch's last hidden states and masks and returns the KL terms and their
statistics; a trainer only decides what goes into the batch and how the terms are divided.

Positions (``KLSettings.positions``): ``corpus`` (the supervised positions; with ``stop_at_violation`` only up
to the first target the oracle flags on its own, or, with a context prior, the first target that completes a
flagged word: :meth:`ConstraintKL.corpus_kl_mask`), ``samples`` (the continuation positions of policy
samples appended to the batch: :meth:`ConstraintKL.append_rows`) or ``both``. Each position set has its own
weight; one guidance pass (and one base-reference pass) serves all of them. With ``stop_at_violating_prefix`` the
oracle itself judges every prefix of each counted continuation (corpus and samples), and the positions after the
first violating prefix are dropped (:func:`violated_positions`): the stop a contextual oracle needs, whose single
tokens flag nothing.

Two implementations of the same numbers (a test checks it):

- ``fused``: one call of :func:`~steer.guidance.fused_constraint_kl` from the hidden states: a chunk of
  positions at a time the LM head, optionally the SFT NLL (and the entropy / top-1 statistics TRL logs), the
  guidance head, q*, the KL and their gradients, never a ``[N, V]`` tensor. Needs a plain ``nn.Linear``
  output head (else it falls back to ``chunked`` with a warning).
- ``chunked`` (the reference): the policy logits and ``z`` at the counted positions are materialised
  (``[N, V]``) and :func:`~steer.guidance.constraint_kl` runs on them.

The guidance pass and the base-reference pass run on the :func:`counted_window` of the batch only (a causal
model's hidden state at ``t`` does not depend on later tokens).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from ..models import reference_model
from .fused_kl import fused_chunk_size, fused_constraint_kl
from .kl import constraint_kl, guided_log_probs
from .model import GuidanceModel, _is_peft_model

logger = logging.getLogger(__name__)

__all__ = [
    "ConstraintKL",
    "KLOutput",
    "KLSettings",
    "counted_window",
    "logit_transform",
    "settled_positions",
    "violated_positions",
]

POSITIONS = ("corpus", "samples", "both")


@dataclass
class KLSettings:
    """The KL fields of ``ConstrainedConfig`` (see its help texts), read in one place."""

    coef: float = 1.0
    sample_coef: float | None = None  # None: coef
    reference: str = "policy"
    implementation: str = "fused"
    positions: str = "both"
    stop_at_violation: bool = True
    stop_when_satisfied: bool = False
    stop_at_violating_prefix: bool = False
    violation_threshold: float = 0.5
    violation_min_tokens: int = 2
    chunk_size: int = 256

    def __post_init__(self) -> None:
        if self.reference not in ("policy", "base"):
            raise ValueError(f"KLSettings.reference must be 'policy' or 'base', got {self.reference!r}")
        if self.implementation not in ("fused", "chunked"):
            raise ValueError(
                f"KLSettings.implementation must be 'fused' or 'chunked', got {self.implementation!r}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"KLSettings.positions must be one of {list(POSITIONS)}, got {self.positions!r}")

    @property
    def enabled(self) -> bool:
        """Whether there is a KL term at all (``coef > 0``; 0 is the plain-SFT baseline)."""
        return self.coef > 0

    @property
    def sample_weight(self) -> float:
        """λ of the policy-sample term (``sample_coef``, else ``coef``)."""
        return self.coef if self.sample_coef is None else self.sample_coef

    @property
    def uses_samples(self) -> bool:
        """Whether policy samples are appended to the training batches."""
        return self.enabled and self.positions != "corpus" and self.sample_weight > 0

    @property
    def needs_token_flags(self) -> bool:
        """Whether the corpus KL stops at tokens the oracle flags (which needs the token prior)."""
        return self.enabled and self.stop_at_violation and self.positions != "samples"


@dataclass
class KLOutput:
    """What :class:`ConstraintKL` returns for one batch.

    ``loss``: ``sum_set weight_set * KL_set`` (plus the weighted NLL when it shared the head pass), with
    gradient, or ``None`` when the batch has no position to count. ``terms``: detached sums over the positions
    of each set computed (``"corpus"``, ``"samples"``; with the NLL also ``"nll"``, ``"entropy"``,
    ``"is_top1"``). ``sample_count``: the number of policy-sample positions (``None`` without sample rows).
    ``metrics``: ``kl_grad_share`` / ``kl_grad_cosine`` when gradient statistics were asked for;
    ``kl_settled_share`` (the share of KL positions after a settling prefix) with ``stop_when_satisfied``.
    """

    loss: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)
    sample_count: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def counted_window(inputs, mask: Tensor):
    """``(input_ids, attention_mask, mask)`` cut to the rows with a position in ``mask`` and up to its last column.

    A causal model's hidden state at ``t`` does not depend on later tokens, so a pass on the cut batch gives the
    same values at the ``mask`` positions. Without any position the batch is returned whole.
    """
    ids, attention = inputs["input_ids"], inputs.get("attention_mask")
    if not bool(mask.any()):
        return ids, attention, mask
    rows, width = mask.any(1), int(mask.any(0).nonzero().max()) + 1
    attention = None if attention is None else attention[rows, :width]
    return ids[rows, :width], attention, mask[rows, :width]


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that the model applies to ``lm_head`` outputs (as TRL's fused head does)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            scale = float(getattr(text, name))
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1.0 / text.logits_scaling
    return (1.0 if scale is None else scale), getattr(text, "final_logit_softcapping", None)


def _last_hidden(output) -> Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


class ConstraintKL:
    """The KL terms of a batch from its hidden states (see the module docstring).

    Args:
        guidance: the :class:`GuidanceModel` whose ``z`` defines q*.
        policy: a callable returning the (unwrapped) policy model: a PEFT model, or a plain causal LM.
        settings: :class:`KLSettings`.
        flagged: ``[V]`` bool, the tokens the oracle flags on their own (for ``stop_at_violation``), or None.
        gathered: a callable returning a context in which the passes run (ZeRO-3: the weights gathered).
        require_fused: refuse the chunked path (ZeRO-3: the KL's gradient needs the gathered head weight).
        prefix_settled: ``token id lists -> [bool]`` for ``stop_when_satisfied``.
        prefix_probs: ``token rows -> [P(satisfied) of every prefix]`` for ``stop_at_violating_prefix``.

    A forward hook on the policy's decoder body keeps its last hidden states inside :meth:`capture`; build this
    object after any deep copy of the policy (a copy would carry the hook along).
    """

    def __init__(
        self,
        guidance: GuidanceModel,
        policy: Callable[[], nn.Module],
        settings: KLSettings,
        *,
        flagged: Tensor | None = None,
        gathered: Callable[[], contextlib.AbstractContextManager] | None = None,
        require_fused: bool = False,
        prefix_settled: Callable[[list[list[int]]], list[bool]] | None = None,
        prefix_probs: Callable[[list[list[int]]], list[Tensor]] | None = None,
    ) -> None:
        if settings.stop_when_satisfied and prefix_settled is None:
            raise ValueError(
                "KLSettings.stop_when_satisfied needs prefix_settled (steer.guidance.prefix_settled_by)"
            )
        if settings.stop_at_violating_prefix and prefix_probs is None:
            raise ValueError(
                "KLSettings.stop_at_violating_prefix needs prefix_probs (Constraint.prefix_probs with a tokenizer)"
            )
        self.guidance, self.settings, self.flagged = guidance, settings, flagged
        self.prefix_settled = prefix_settled if settings.stop_when_satisfied else None
        self.prefix_probs = prefix_probs if settings.stop_at_violating_prefix else None
        self._policy, self._gathered, self._require_fused = policy, gathered, require_fused
        model = policy()
        inner = model.get_base_model() if _is_peft_model(model) else model
        self.logit_scale, self.softcap = logit_transform(inner.config)
        decoder = getattr(inner, "base_model", inner)
        if decoder is inner:
            raise ValueError(
                f"cannot find the decoder body of {type(inner).__name__} to read its hidden states"
            )
        self.decoder = decoder
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(type(inner).forward).parameters
        self._captured: list[Tensor] | None = None
        self._warned_fallback = False
        self._hook = decoder.register_forward_hook(self._capture_hidden)

    # ------------------------------------------------------------------ the policy's hidden states
    def _capture_hidden(self, module, args, output) -> None:
        if self._captured is not None and not self._captured:
            self._captured.append(_last_hidden(output))

    @contextlib.contextmanager
    def capture(self, enabled: bool = True):
        """Inside the block, the first forward of the decoder body leaves its last hidden states in the yielded
        list (``None`` when not ``enabled``)."""
        self._captured = [] if enabled else None
        try:
            yield self._captured
        finally:
            self._captured = None

    def body_forward(self, model, inputs) -> Tensor:
        """The policy's last hidden states ``[B, T, H]`` from its (wrapped) forward, the head on one position only."""
        kwargs = {key: value for key, value in inputs.items() if key != "labels"}
        kwargs.update(use_cache=False, logits_to_keep=1)
        with self.capture() as captured:
            model(**kwargs)
            if not captured:
                raise RuntimeError(
                    "ConstrainedTrainer could not read the policy's hidden states for the KL term"
                )
            return captured[0]

    # ------------------------------------------------------------------ positions
    @staticmethod
    def corpus_mask(inputs) -> tuple[Tensor, Tensor]:
        """Hidden positions ``[B, T]`` whose next-token distribution SFT supervises, and their target ids."""
        if "shift_labels" in inputs:
            labels = inputs["shift_labels"]
            return labels != -100, labels
        labels = inputs["labels"]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        return mask, targets

    def corpus_kl_mask(self, inputs, supervised: Tensor, targets: Tensor) -> Tensor:
        """The supervised positions the corpus KL counts: all, or up to the first flagged target token (or, with
        a context prior, the first target that completes a flagged word)."""
        if not self.settings.stop_at_violation or self.flagged is None:
            return supervised
        flagged = self.flagged.to(targets.device)[targets.clamp(min=0)] & supervised
        prior = self.guidance.context_prior
        if prior is not None and bool(supervised.any()):
            rows, width = supervised.shape  # the corpus rows (policy-sample rows may follow them in inputs)
            ids, attention = inputs["input_ids"][:rows, :width], inputs.get("attention_mask")
            contexts = self.guidance.contexts(ids, None if attention is None else attention[:rows, :width])
            completes = prior.flags_at(contexts[supervised], targets[supervised])
            flagged = flagged.clone()
            flagged[supervised] |= completes.to(flagged.device)
        before = flagged.long().cumsum(1) - flagged.long()  # flagged targets strictly before this position
        return supervised & (before == 0)

    @staticmethod
    def append_rows(inputs: dict, rows: dict, pad_token_id: int) -> dict:
        """``inputs`` with the sample rows appended (labels -100: SFT ignores them), padded to one width."""
        device = inputs["input_ids"].device
        width = max(inputs["input_ids"].shape[1], rows["input_ids"].shape[1])

        def widen(tensor, value):
            pad = width - tensor.shape[1]
            return torch.nn.functional.pad(tensor, (0, pad), value=value) if pad else tensor

        extra = {
            "input_ids": rows["input_ids"],
            "attention_mask": rows["attention_mask"],
            "labels": torch.full_like(rows["input_ids"], -100),
        }
        out = dict(inputs)
        for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", -100)):
            if key not in inputs:
                continue
            out[key] = torch.cat([widen(inputs[key], fill), widen(extra[key].to(device), fill)])
        for key in ("position_ids", "completion_mask", "assistant_masks", "shift_labels"):
            if key in inputs:
                raise ValueError(f"kl_positions with samples does not support batches carrying {key!r}")
        return out

    # ------------------------------------------------------------------ heads and passes
    def _head(self) -> nn.Module:
        return self._policy().get_output_embeddings()

    def head_is_linear(self) -> bool:
        """Whether the policy's output head is a plain ``nn.Linear`` (under FSDP2: its wrapped class is)."""
        from torch.distributed.fsdp import FSDPModule

        head = self._head()
        kind = type(head)
        if isinstance(head, FSDPModule):
            kind = kind.__bases__[-1]  # fully_shard's class FSDP<cls>(FSDPModule, cls)
        return kind is torch.nn.Linear

    def fused_head(self) -> nn.Linear | None:
        """The policy's output head when the fused KL can use its weights directly, else None (with a warning)."""
        from torch.distributed.fsdp import FSDPModule

        if self.settings.implementation != "fused":
            return None
        head = self._head()
        if self.head_is_linear():
            if isinstance(head, FSDPModule):
                head.unshard()  # FSDP2: the head's unit (every rank, in step); a no-op after the policy forward
            return head
        if not self._warned_fallback:
            logger.warning(
                "kl_implementation='fused' needs a plain nn.Linear output head, got %s; using 'chunked'",
                type(head).__name__,
            )
            self._warned_fallback = True
        return None

    def shares_head(self, inputs) -> bool:
        """Whether the fused pass can also compute the SFT NLL of ``inputs`` (one head pass for SFT and KL).

        The trainer adds its own conditions (TRL's loss needed, e.g. label smoothing)."""
        if not self.settings.enabled or self.settings.implementation != "fused":
            return False
        if "labels" not in inputs or "shift_labels" in inputs or not self.accepts_logits_to_keep:
            return False
        return self.head_is_linear()

    def head_logits(self, hidden: Tensor) -> Tensor:
        """The policy's logits from its hidden states (its head and logit transform)."""
        logits = self._head()(hidden)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def contexts(self, inputs, mask: Tensor) -> Tensor | None:
        """The context prior's ``[N, L]`` view of the ``mask`` positions (``None`` without a context prior)."""
        contexts = self.guidance.contexts(inputs["input_ids"], inputs.get("attention_mask"))
        return None if contexts is None else contexts[mask.to(contexts.device)]

    def guidance_hidden(self, inputs, union: Tensor) -> Tensor:
        """The guidance model's last hidden states ``[N, Hg]`` at the ``union`` positions (no grad), from a pass on
        the :func:`counted_window` only."""
        if not bool(union.any()):
            return torch.zeros(0, self.guidance.head.weight.shape[1], device=union.device)
        ids, attention, union = counted_window(inputs, union)
        return self.guidance.hidden_states(ids, attention)[union]

    def reference_hidden(self, inputs, mask: Tensor) -> Tensor:
        """The frozen reference's last hidden states ``[N, H]`` at the counted positions (no grad,
        :func:`steer.models.reference_model`), from a pass on the :func:`counted_window` only."""
        ids, attention, mask = counted_window(inputs, mask)
        with torch.no_grad(), reference_model(self._policy()):
            out = self.decoder(input_ids=ids, attention_mask=attention, use_cache=False)
        return _last_hidden(out)[mask]

    def reference_logits(self, inputs, mask: Tensor, policy_logits: Tensor) -> Tensor:
        if self.settings.reference == "policy":
            return policy_logits.detach()
        model = self._policy()
        with torch.no_grad(), reference_model(model):
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
            ).logits
        return logits[mask]

    # ------------------------------------------------------------------ the terms
    def __call__(
        self,
        inputs,
        hidden: Tensor,
        *,
        supervised: Tensor,
        targets: Tensor,
        n_corpus: int,
        continuation_mask: Tensor | None = None,
        denom: Tensor,
        factor: int = 1,
        accumulation: int = 1,
        share_nll: bool = False,
        grad_stats: bool = False,
    ) -> KLOutput:
        """The KL terms of a batch whose first ``n_corpus`` rows are the corpus and the rest policy samples.

        Args:
            inputs: the batch (``input_ids``, ``attention_mask``; sample rows appended by :meth:`append_rows`).
            hidden: ``[B, T, H]`` the policy's last hidden states on ``inputs`` (with gradient).
            supervised, targets: :meth:`corpus_mask` of the corpus rows.
            continuation_mask: ``[S, T']`` the sample rows' continuation tokens, or None without sample rows.
            denom, factor: the corpus term is ``coef * factor / denom * sum`` (the SFT loss's token count and
                its scale across processes); the NLL, when ``share_nll``, gets ``factor / denom``.
            accumulation: gradient accumulation steps the sample term (a mean over its tokens) is spread over.
            share_nll: also compute the SFT NLL of the corpus rows in the fused pass (see :meth:`shares_head`).
            grad_stats: log the KL gradient's share of the total at the counted corpus positions.
        """
        s = self.settings
        total, width = inputs["input_ids"].shape[0], hidden.shape[1]
        out = KLOutput()

        def positions() -> Tensor:
            return torch.zeros(total, width, dtype=torch.bool, device=hidden.device)

        masks = {}
        if s.positions in ("corpus", "both"):
            corpus = positions()
            corpus[:n_corpus, : supervised.shape[1]] = self.corpus_kl_mask(inputs, supervised, targets)
            masks["corpus"] = corpus
        if continuation_mask is not None:
            cont = continuation_mask.to(hidden.device)
            sample = positions()
            sample[n_corpus:, : cont.shape[1] - 1] = cont[:, 1:]  # position t predicts continuation token t+1
            masks["samples"] = sample
            out.sample_count = sample.sum().float()
        if self.prefix_probs is not None and masks:
            kl_union = _union(masks.values(), like=hidden[..., 0])
            violated = violated_positions(
                inputs["input_ids"],
                kl_union,
                self.prefix_probs,
                s.violation_threshold,
                s.violation_min_tokens,
            ).to(kl_union.device)
            out.metrics["kl_violated_share"] = (
                float(violated[kl_union].float().mean()) if kl_union.any() else 0.0
            )
            masks = {name: mask & ~violated for name, mask in masks.items()}
        nll = None
        if share_nll:  # the corpus rows' SFT targets, on the (possibly widened) batch
            nll_mask = positions()
            nll_mask[:n_corpus, : supervised.shape[1]] = supervised
            nll_targets = torch.full_like(nll_mask, -100, dtype=torch.long)
            nll_targets[:n_corpus, : targets.shape[1]] = targets
            nll = (nll_mask, nll_targets, factor / denom)
        if not masks and nll is None:
            return out
        weights = {}
        if "corpus" in masks:
            weights["corpus"] = (s.coef * factor) / denom
        if "samples" in masks:
            weights["samples"] = s.sample_weight / (out.sample_count * accumulation).clamp(min=1)
        settled = None
        if self.prefix_settled is not None and masks:
            kl_union = _union(masks.values(), like=hidden[..., 0])
            settled = settled_positions(inputs["input_ids"], kl_union, self.prefix_settled)
            out.metrics["kl_settled_share"] = (
                float(settled[kl_union].float().mean()) if kl_union.any() else 0.0
            )
        with self._gathered() if self._gathered is not None else contextlib.nullcontext():
            out.terms, out.loss = self._terms(
                inputs, hidden, masks, weights, targets, nll, grad_stats, out.metrics, settled
            )
        return out

    def _terms(self, inputs, hidden, masks, weights, targets, nll, grad_stats, metrics, settled=None):
        """Detached KL sums ``{name: sum over positions}`` per position set, and ``sum_name weights[name] * sum``.

        ``nll`` = ``(mask [B, T], targets [B, T], weight)`` (fused only) adds the SFT NLL to the same pass.
        ``settled`` ([B, T], ``stop_when_satisfied``): positions after a prefix that settles the constraint, where
        R = 1 (``z`` = :data:`SETTLED_Z`) and q* is the reference.
        """
        union = _union(masks.values(), like=hidden[..., 0])
        if nll is not None:
            union |= nll[0]
        zero = hidden.new_zeros((), dtype=torch.float32)
        if not bool(union.any()) and nll is None:
            return {name: zero for name in masks}, zero
        log_share = grad_stats and "corpus" in masks
        head = self.fused_head()
        if head is None and self._require_fused:
            raise UserInputError(
                "ConstrainedTrainer under DeepSpeed ZeRO-3 needs kl_implementation='fused' and a plain nn.Linear "
                "output head (the KL's gradient must be computed while the head's weight is gathered)"
            )
        if head is not None:
            return self._fused_terms(
                inputs, hidden, masks, weights, union, head, log_share, nll, metrics, settled
            )
        if nll is not None:
            raise RuntimeError("the SFT NLL shares the head pass only on the fused path")
        policy_logits = self.head_logits(hidden[union])  # [N, V], with gradient
        with torch.no_grad():  # z only where the KL counts (the guidance head is vocabulary-wide)
            z = self.guidance.logits(self.guidance_hidden(inputs, union), self.contexts(inputs, union))
            if settled is not None:
                z = z.masked_fill(settled[union][:, None], SETTLED_Z)
        ref_logits = self.reference_logits(inputs, union, policy_logits)
        terms, total = {}, zero
        for name, mask in masks.items():
            rows = mask[union]
            term = constraint_kl(
                policy_logits[rows][None],
                ref_logits[rows][None],
                z[rows][None],
                None,
                chunk_size=self.settings.chunk_size,
                reduction="sum",
            )
            terms[name] = term.detach()
            total = total + weights[name] * term
        if log_share:
            shares = self._grad_share(policy_logits.detach(), ref_logits, z, masks, union, targets)
            if shares is not None:
                metrics.update(_share_metrics(*shares))
        return terms, total

    def _fused_terms(
        self, inputs, hidden, masks, weights, union, head, log_share, nll, metrics, settled=None
    ):
        """:meth:`_terms` from hidden states: every position set (and the NLL) in one chunked head + KL pass.

        The rows go in KL positions first (row-major), then the NLL-only ones, so the guidance model (and the
        base reference) run only up to the KL positions and the fused pass computes no ``z`` for the rest.
        """
        kl_union = _union(masks.values(), like=union)
        flat_union, flat_kl = union.reshape(-1), kl_union.reshape(-1)
        order = torch.cat([flat_kl.nonzero().view(-1), (flat_union & ~flat_kl).nonzero().view(-1)])
        n_kl = int(flat_kl.sum())
        policy_hidden = hidden.reshape(-1, hidden.shape[-1])[order]  # [N, H], with gradient
        with torch.no_grad():
            guidance_hidden = self.guidance_hidden(inputs, kl_union)
        base_hidden = self.reference_hidden(inputs, kl_union) if self.settings.reference == "base" else None
        rows = {name: mask.reshape(-1)[order] for name, mask in masks.items()}
        row_weight = torch.zeros(policy_hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for name, mask in rows.items():
            weight = torch.as_tensor(weights[name], device=hidden.device).float()
            row_weight = row_weight + mask.float() * weight
        nll_kwargs = {}
        if nll is not None:
            nll_mask, nll_targets, nll_weight = nll
            nll_kwargs = {
                "targets": torch.where(nll_mask, nll_targets, -100).reshape(-1)[order],
                "nll_weight": torch.as_tensor(nll_weight, device=hidden.device).float(),
            }
        contexts = self.contexts(inputs, kl_union)
        settled_rows = None if settled is None else settled.reshape(-1)[order][:n_kl]

        def z_fn(start: int, end: int, out: Tensor | None = None) -> Tensor:
            part = None if contexts is None else contexts[start:end]
            z = self.guidance.logits(guidance_hidden[start:end], part, out=out)
            if settled_rows is not None:
                z.masked_fill_(settled_rows[start:end, None], SETTLED_Z)
            return z

        z_fn.writes_into = True  # the fused pass may hand over its scratch buffer
        result = fused_constraint_kl(
            policy_hidden,
            head.weight,
            head.bias,
            z_fn,
            reference="policy" if base_hidden is None else base_hidden,
            row_weight=row_weight,
            logit_scale=self.logit_scale,
            logit_softcap=self.softcap,
            chunk_size=min(
                self.settings.chunk_size, fused_chunk_size(policy_hidden.shape[0], vocab=head.weight.shape[0])
            ),
            reduction="sum",
            kl_rows=n_kl,
            grad_stats=log_share,
            **nll_kwargs,
        )
        if log_share and bool(rows["corpus"].any()):
            # the gradient statistics came out of the same pass (no extra head pass)
            dd, lm_sq, dot = result.grad_stats[rows["corpus"]].double().sum(0).tolist()
            coef = float(self.settings.coef)
            metrics.update(_share_metrics(coef * coef * dd, lm_sq, coef * dot))
        terms = {name: result.kl[mask].sum() for name, mask in rows.items()}
        if nll is not None:
            terms.update(nll=result.nll.sum(), entropy=result.entropy.sum(), is_top1=result.is_top1.sum())
        return terms, result.loss

    def _grad_share(
        self, policy_logits, ref_logits, z, masks, union, targets
    ) -> tuple[float, float, float] | None:
        """``|g_kl|^2``, ``|g_lm|^2`` and ``<g_kl, g_lm>`` (w.r.t. the logits) at the counted corpus positions.

        Chunked like the KL itself (``chunk_size`` rows at a time), so it never holds an [N, V] tensor more.
        """
        rows = masks["corpus"][union]
        if not bool(rows.any()):
            return None
        chunk, coef = self.settings.chunk_size, self.settings.coef
        target = targets[masks["corpus"][: targets.shape[0], : targets.shape[1]]].clamp(min=0)
        index = rows.nonzero().view(-1)
        kl_sq = lm_sq = dot = 0.0
        with torch.no_grad():
            for start in range(0, len(target), chunk):
                part = slice(start, start + chunk)
                rows_part = index[part]
                p = torch.softmax(policy_logits[rows_part].float(), -1)
                log_q = guided_log_probs(ref_logits[rows_part], z[rows_part])
                kl_grad = coef * (p - log_q.exp())
                p[torch.arange(p.shape[0]), target[part]] -= 1.0  # p is now the LM gradient
                kl_sq += float(kl_grad.square().sum())
                lm_sq += float(p.square().sum())
                dot += float((kl_grad * p).sum())
        return kl_sq, lm_sq, dot


SETTLED_Z = 40.0  # logsigmoid(40) = -4e-18: R = 1 to float precision


def settled_positions(
    input_ids: Tensor, mask: Tensor, prefix_settled: Callable[[list[list[int]]], list[bool]]
) -> Tensor:
    """``[B, T]`` bool: the masked positions whose continuation so far already settles a monotone constraint.

    A row's continuation starts after its first masked position (position ``t`` predicts token ``t + 1``, so the
    first one predicts the first continuation token); at position ``t`` the continuation so far is the tokens
    ``first + 1 .. t``. ``prefix_settled`` (:func:`~steer.guidance.prefix_settled_by`) judges all of them at once.
    """
    out = torch.zeros_like(mask)
    where, prefixes = [], []
    ids = input_ids.tolist()
    for row in range(mask.shape[0]):
        positions = mask[row].nonzero().view(-1).tolist()
        if not positions:
            continue
        first = positions[0]
        for t in positions[1:]:
            where.append((row, t))
            prefixes.append(ids[row][first + 1 : t + 1])
    if prefixes:
        flags = prefix_settled(prefixes)
        hit = [w for w, f in zip(where, flags) if f]
        if hit:
            rows, cols = zip(*hit)
            out[list(rows), list(cols)] = True
    return out


def violated_positions(
    input_ids: Tensor,
    mask: Tensor,
    prefix_probs: Callable[[list[list[int]]], list[Tensor]],
    threshold: float,
    min_tokens: int = 1,
) -> Tensor:
    """``[B, T]`` bool: the masked positions after the first prefix of the continuation, of at least ``min_tokens``
    tokens, that the oracle calls violating (P(satisfied) < ``threshold``).

    As in :func:`settled_positions`, a row's continuation starts after its first masked position and at position
    ``t`` it is the tokens ``first + 1 .. t``; once one of its prefixes violates, every later position does.
    ``prefix_probs`` (:meth:`~steer.constraints.Constraint.prefix_probs`) scores each row's continuation up to
    its last masked position, every prefix of it at once.
    """
    out = torch.zeros_like(mask)
    ids = input_ids.tolist()
    rows, starts, continuations = [], [], []
    for row in range(mask.shape[0]):
        positions = mask[row].nonzero().view(-1).tolist()
        if len(positions) < 2:
            continue
        rows.append(row)
        starts.append(positions[0] + 1)
        continuations.append(ids[row][positions[0] + 1 : positions[-1] + 1])
    if not rows:
        return out
    skip = max(min_tokens, 1) - 1  # the prefixes too short to judge
    for row, start, probs in zip(rows, starts, prefix_probs(continuations)):
        bad = (probs.reshape(-1)[skip:] < threshold).nonzero()
        if bad.numel():
            out[row, start + skip + int(bad[0]) :] = True
    return out & mask


def _union(masks, like: Tensor) -> Tensor:
    """The positions in any of ``masks`` (bool tensors shaped like ``like``); all False when there are none."""
    union = torch.zeros_like(like, dtype=torch.bool)
    for mask in masks:
        union |= mask
    return union


def _share_metrics(kl_sq: float, lm_sq: float, dot: float) -> dict[str, Any]:
    """The KL gradient's share and cosine from ``|g_kl|^2``, ``|g_lm|^2`` and ``<g_kl, g_lm>`` (logits)."""
    kl_norm, lm_norm = math.sqrt(max(kl_sq, 0.0)), math.sqrt(max(lm_sq, 0.0))
    return {
        "kl_grad_share": kl_norm / max(kl_norm + lm_norm, 1e-12),
        "kl_grad_cosine": dot / max(kl_norm * lm_norm, 1e-12),
    }
