"""The NADO guidance objective: token-level BCE against sequence labels, plus optional regularisers.

At every sampled continuation token ``x_t`` the guidance logit ``z_{t-1}[x_t]`` (the model's belief that
the sequence will satisfy the constraint given ``x<=t``) is fitted to the sequence label with
binary cross-entropy *with logits* (on ``z`` itself, never on ``logsigmoid(z)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .head import shared_logit, token_logits

__all__ = [
    "guidance_loss",
    "guidance_loss_from_hidden",
    "importance_weights",
    "sampled_token_logits",
    "suffix_importance_weights",
]


def importance_weights(
    target_log_probs: Tensor, sampling_log_probs: Tensor, *, max_weight: float | None = None
) -> Tensor:
    """Self-normalised importance weights ``w_i ∝ p_target(x_i) / p_sampling(x_i)``, mean 1.

    Use them when samples came from one distribution (the policy, a tempered or truncated sampler) but the
    guidance model should estimate R under another (the base model, the untempered distribution).

    ``max_weight`` truncates the normalised weights at the cap (truncated importance sampling: bounded
    variance for a little bias). They are *not* renormalised afterwards, which would push them back above
    the cap; their mean is then at most 1, which losses that self-normalise over the weights (as
    :func:`guidance_loss` does) do not mind.
    """
    log_w = target_log_probs.double() - sampling_log_probs.double()
    weights = torch.softmax(log_w, dim=0) * log_w.numel()
    if max_weight is not None:
        if not max_weight > 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")
        weights = weights.clamp(max=max_weight)
    return weights.float()


def suffix_importance_weights(
    target_token_log_probs: Tensor, sampling_token_log_probs: Tensor, mask: Tensor, *, max_weight: float
) -> Tensor:
    """Per-position importance weights ``[B, T-1]`` for the guidance loss: at the logit of token ``t+1`` (the
    loss's position ``t``), ``p_target / p_sampling`` of the tokens *after* it, truncated at ``max_weight``.

    ``R(x<=t+1) = P(C | x<=t+1)`` is a conditional: which prefixes the samples visit does not change its value,
    only how the continuation goes on from there does. So only the rest of the sequence is re-weighted, not the
    prefix. A whole-sequence weight (:func:`importance_weights`) also re-weights the prefix: where the sampling
    policy prefers prefixes that satisfy the constraint, the samples that carry the most information about R get
    the smallest weights. The last token's weight is 1 (nothing follows it: its label is exact). Each weight is
    an unbiased ratio on its own (mean 1 under the sampling policy); :func:`guidance_loss` self-normalises.

    Args:
        target_token_log_probs / sampling_token_log_probs: ``[B, T-1]`` log-probabilities of token ``t+1``.
        mask: ``[B, T-1]`` bool, the continuation tokens (the rest contribute nothing).
    """
    if not max_weight > 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}")
    delta = (target_token_log_probs.double() - sampling_token_log_probs.double()) * mask.double()
    # sum over the strictly later tokens: reverse cumulative sum, minus the token itself
    after = delta.flip(-1).cumsum(-1).flip(-1) - delta
    return after.clamp(max=math.log(max_weight)).exp().float()


def _bernoulli_kl(log_a: Tensor, log_1ma: Tensor, log_b: Tensor, log_1mb: Tensor) -> Tensor:
    """KL(Bernoulli(a) || Bernoulli(b)) from log-probabilities (stable near 0 and 1)."""
    a = log_a.exp()
    return a * (log_a - log_b) + (1 - a) * (log_1ma - log_1mb)


def guidance_loss(
    z: Tensor,
    input_ids: Tensor,
    continuation_mask: Tensor,
    labels: Tensor,
    *,
    weights: Tensor | None = None,
    consistency_coef: float = 0.0,
    ref_logits: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """BCE between ``sigmoid(z[b, t-1, x_t])`` and ``labels[b]`` at every continuation token.

    Args:
        z: ``[B, T, V]`` guidance logits (position t scores the candidates for token t+1).
        input_ids: ``[B, T]`` sampled sequences (prompt + continuation).
        continuation_mask: ``[B, T]`` bool, True at sampled continuation tokens (prompt, padding and
            anything after the first EOS are False).
        labels: ``[B]`` sequence labels in [0, 1] (hard 0/1 or soft scores).
        weights: optional non-negative weights, ``[B]`` per sample (e.g. :func:`importance_weights`) or ``[B, T-1]``
            per scored token (:func:`suffix_importance_weights`). The loss is a weighted mean over tokens, so it is
            invariant to the weights' overall scale (self-normalised).
        consistency_coef: weight of the consistency regulariser
            ``KL(Bern(R(x<=t)) || Bern(sum_v p(v | x<=t) R(x<=t, v)))`` at consecutive continuation tokens.
        ref_logits: ``[B, T, V]`` logits of the sampling distribution p; required when ``consistency_coef > 0``.

    Returns:
        ``(loss, metrics)``; metrics hold floats: ``bce``, ``consistency``, ``r_mean`` (mean R at the
        sampled tokens), ``accuracy`` (R > 0.5 agrees with label >= 0.5), ``label_mean``, ``tokens``.
    """
    if z.dim() != 3:
        raise ValueError(f"z must be [B, T, V], got shape {tuple(z.shape)}")
    batch, length, _ = z.shape
    if input_ids.shape != (batch, length):
        raise ValueError(f"input_ids must be [B, T] = {(batch, length)}, got {tuple(input_ids.shape)}")
    if continuation_mask.shape != (batch, length):
        raise ValueError(
            f"continuation_mask must be [B, T] = {(batch, length)}, got {tuple(continuation_mask.shape)}"
        )
    if labels.shape != (batch,):
        raise ValueError(f"labels must be [B] = ({batch},), got {tuple(labels.shape)}")
    if consistency_coef < 0:
        raise ValueError(f"consistency_coef must be >= 0, got {consistency_coef}")
    if consistency_coef > 0 and ref_logits is None:
        raise ValueError("consistency_coef > 0 needs ref_logits (the sampling distribution's logits)")
    # Token t is scored by the distribution at position t-1.
    token_logits = z[:, :-1].gather(-1, input_ids[:, 1:].to(z.device).unsqueeze(-1)).squeeze(-1).float()
    loss, metrics = _bce_terms(token_logits, continuation_mask.to(z.device), labels, weights)
    token_weights = metrics.pop("_token_weights")

    if consistency_coef > 0:
        if ref_logits.shape != z.shape:
            raise ValueError(
                f"ref_logits must have the shape of z {tuple(z.shape)}, got {tuple(ref_logits.shape)}"
            )
        consistency = _consistency(
            token_logits,
            token_weights,
            continuation_mask.to(z.device),
            lambda b, t: z[b, t].float(),
            lambda b, t: ref_logits[b, t],
        )
        loss = loss + consistency_coef * consistency
        metrics["consistency"] = float(consistency.detach())
    return loss, metrics


def _consistency(
    token_logits: Tensor, token_weights: Tensor, continuation_mask: Tensor, z_rows, ref_rows
) -> Tensor:
    """``KL(Bern(R(x<=t)) || Bern(E_{v~p(.|x<=t)} R(x<=t, v)))`` averaged over consecutive continuation tokens.

    ``R(x<=t) = sigmoid(token_logits[b, t-1])``; ``z_rows(b, t)`` / ``ref_rows(b, t)`` give the guidance logits
    and the sampling distribution's logits ``[n, V]`` at positions ``(b, t)`` (full rows only where needed).
    """
    mask = continuation_mask[:, 1:].to(device=token_logits.device, dtype=torch.bool)
    pair = mask[:, :-1] & mask[:, 1:]  # token t and token t+1 are both continuation tokens
    rows_b, rows_t = pair.nonzero(as_tuple=True)
    if not rows_b.numel():
        return torch.zeros((), device=token_logits.device)
    r_logit = token_logits[rows_b, rows_t]
    next_z = z_rows(rows_b, rows_t + 1).float()
    log_p = torch.log_softmax(ref_rows(rows_b, rows_t + 1).detach().float(), dim=-1)
    log_e = torch.logsumexp(log_p + F.logsigmoid(next_z), dim=-1)
    log_1me = torch.logsumexp(log_p + F.logsigmoid(-next_z), dim=-1)
    kl = _bernoulli_kl(F.logsigmoid(r_logit), F.logsigmoid(-r_logit), log_e, log_1me)
    w = token_weights[rows_b, rows_t]
    return (kl * w).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)


def _bce_terms(
    token_logits: Tensor, continuation_mask: Tensor, labels: Tensor, weights: Tensor | None
) -> tuple[Tensor, dict]:
    """Weighted BCE of ``token_logits`` [B, T-1] (token t+1's logit) against the sequence labels.

    Returns the loss and the metrics, plus ``_token_weights`` [B, T-1] for the consistency term.
    """
    batch = token_logits.shape[0]
    device = token_logits.device
    labels = labels.to(device=device, dtype=torch.float32)
    if torch.isnan(labels).any() or (labels < 0).any() or (labels > 1).any():
        raise ValueError("labels must lie in [0, 1] (drop samples whose oracle score failed before training)")
    mask = continuation_mask[:, 1:].to(device=device, dtype=torch.bool)
    targets = labels[:, None].expand_as(token_logits)
    bce = F.binary_cross_entropy_with_logits(token_logits, targets, reduction="none")
    token_weights = mask.float()
    if weights is not None:
        if weights.shape not in ((batch,), tuple(token_logits.shape)):
            raise ValueError(
                f"weights must be [B] = ({batch},) or [B, T-1] = {tuple(token_logits.shape)}, got "
                f"{tuple(weights.shape)}"
            )
        sample_weights = weights.to(device=device, dtype=torch.float32)
        if (sample_weights < 0).any() or not torch.isfinite(sample_weights).all():
            raise ValueError("weights must be finite and non-negative")
        token_weights = token_weights * (
            sample_weights[:, None] if sample_weights.dim() == 1 else sample_weights
        )
    denom = token_weights.sum().clamp(min=torch.finfo(torch.float32).tiny)
    loss = (bce * token_weights).sum() / denom
    with torch.no_grad():
        count = mask.sum()
        n = count.clamp(min=1).float()
        probs = torch.sigmoid(token_logits)
        metrics = {
            "bce": float(loss),
            "consistency": 0.0,
            "r_mean": float((probs * mask).sum() / n),
            "accuracy": float((((probs > 0.5) == (targets >= 0.5)) & mask).sum() / n),
            "label_mean": float(labels.mean()) if batch else 0.0,
            "tokens": float(count),
            "_token_weights": token_weights,
        }
    return loss, metrics


def sampled_token_logits(
    hidden: Tensor, head: torch.nn.Linear, input_ids: Tensor, offsets: Tensor | None = None
) -> Tensor:
    """``z[b, t-1, x_t]`` for every sampled token, ``[B, T-1]``, from the head rows of those tokens only.

    ``offsets [B, T-1]``: fixed additions to those logits (the guidance model's context prior,
    :meth:`~steer.guidance.GuidanceModel.token_offsets`). A :class:`~steer.guidance.head.GuidanceHead` with a
    shared context logit adds it at every position, and one with a token term adds it for the sampled tokens."""
    targets = input_ids[:, 1:].to(hidden.device)
    logits = (hidden[:, :-1].float() * head.weight[targets].float()).sum(-1)
    if head.bias is not None:
        logits = logits + head.bias[targets].float()
    extra = shared_logit(head, hidden[:, :-1])
    if extra is not None:
        logits = logits + extra
    term = token_logits(head, hidden[:, :-1], targets)
    if term is not None:
        logits = logits + term
    if offsets is not None:
        logits = logits + offsets.to(logits.device)
    return logits


def guidance_loss_from_hidden(
    hidden: Tensor,
    head: torch.nn.Linear,
    input_ids: Tensor,
    continuation_mask: Tensor,
    labels: Tensor,
    *,
    weights: Tensor | None = None,
    consistency_coef: float = 0.0,
    ref_logits_fn=None,
    guidance=None,
) -> tuple[Tensor, dict[str, float]]:
    """:func:`guidance_loss` from the backbone's hidden states, computing only what the loss needs.

    ``guidance``: the :class:`~steer.guidance.GuidanceModel` that ``head`` belongs to; its context prior (if any)
    adds its fixed offsets to ``z`` (at the sampled tokens, and on the consistency term's full rows through
    :meth:`~steer.guidance.GuidanceModel.logits`).

    The BCE needs ``z`` at the sampled tokens only: their head rows are gathered (``[B, T, H]`` work, never
    ``[B, T, V]``). The full vocabulary row is computed only where the consistency term needs it (consecutive
    continuation tokens), and ``ref_logits_fn(rows_b, rows_t)`` supplies the sampling distribution's logits
    ``[n, V]`` at those positions. Equal to :func:`guidance_loss` on ``z = head(hidden)`` (a test checks it).
    """
    batch, length, _ = hidden.shape
    if input_ids.shape != (batch, length) or continuation_mask.shape != (batch, length):
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and continuation_mask {tuple(continuation_mask.shape)} must be "
            f"[B, T] = {(batch, length)}"
        )
    if consistency_coef > 0 and ref_logits_fn is None:
        raise ValueError("consistency_coef > 0 needs ref_logits_fn (the sampling distribution's logits)")
    if guidance is not None and head is not guidance.head:
        raise ValueError("guidance_loss_from_hidden: head must be guidance.head when guidance is given")
    hidden = hidden.float()
    contexts = None if guidance is None else guidance.contexts(input_ids)
    offsets = None if contexts is None else guidance.token_offsets(input_ids, contexts=contexts)
    token_logits = sampled_token_logits(hidden, head, input_ids, offsets)
    loss, metrics = _bce_terms(token_logits, continuation_mask.to(hidden.device), labels, weights)
    token_weights = metrics.pop("_token_weights")
    if consistency_coef > 0:

        def rows(b, t):
            if guidance is not None:  # z with the context prior's offsets (GuidanceModel.logits)
                return guidance.logits(
                    hidden[b, t], None if contexts is None else contexts.to(hidden.device)[b, t]
                )
            return head(hidden[b, t])  # a bare head (with its shared logit and token term): no offsets

        consistency = _consistency(
            token_logits, token_weights, continuation_mask.to(hidden.device), rows, ref_logits_fn
        )
        loss = loss + consistency_coef * consistency
        metrics["consistency"] = float(consistency.detach())
    return loss, metrics
