"""Fused output head + constraint KL(q* || p_theta) (+ optional NLL) that never holds ``[N, V]`` tensors.

:func:`fused_constraint_kl` takes the policy's last hidden states at the counted positions instead of its
logits. A chunk of positions at a time it computes

* the policy logits (the LM head matmul in fp32, then the model's logit scale / soft-capping),
* ``z`` (the guidance head on the guidance model's hidden states, or a callable; no gradient),
* the reference (the detached policy logits, or the base model's from its hidden states and the same head),
* ``log q* = log_softmax(ref + logsigmoid(z))``, the KL summed over the vocabulary per position,
* optionally the NLL of target ids from the same policy log-softmax (the SFT loss), with the policy's
  entropy and whether its top-1 token is the target (the metrics TRL's SFT loss logs), so one head pass
  serves the whole constrained loss,

and the gradients with respect to the policy hidden states, the head weight and the head bias (each only
when it requires grad) during the forward pass, as Liger-Kernel's fused linear cross-entropy / JSD do.
The working set is three ``[chunk, V]`` fp32 tensors (plus a ``[chunk, V]`` low-precision copy of the
logit gradient with bf16/fp16 heads on CUDA), the ``[N, H]`` hidden-state gradient and, only when the head
is trained, a ``[V, H]`` fp32 weight gradient. Backward multiplies the stored gradients by the upstream gradient.

Coefficients go into the per-row weights, so one pass gives the whole loss::

    out = fused_constraint_kl(h, lm_head.weight, None, g, guidance.head.weight, guidance.head.bias,
                              row_weight=kl_coef / n_tokens * kl_rows_mask, targets=labels,
                              nll_weight=1 / n_tokens)
    out.loss.backward()    # = sum_i row_weight_i * KL_i + sum_i nll_weight_i * NLL_i
    out.kl, out.nll        # per-row values (detached, unweighted) for logging
    out.entropy, out.is_top1   # with targets: per-row policy entropy and top-1 == target

The chunked reference that works on materialised logits is :func:`steer.guidance.kl.constraint_kl`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .head import has_context_terms
from .kl import _row_dot

__all__ = ["FusedConstraintKL", "FusedKLOutput", "fused_chunk_size", "fused_constraint_kl"]

ZFn = Callable[[int, int], Tensor]
_SCRATCH_DEVICES = ("cpu",)  # device types whose chunks share scratch buffers (no caching allocator there)
_NEG = torch.finfo(torch.float32).min  # stands in for log 0, so that 0 * log 0 = 0 in the row dots


class FusedKLOutput(NamedTuple):
    """Result of :func:`fused_constraint_kl`.

    ``loss``: scalar fp32, the only differentiable output: ``sum_i row_weight_i * KL_i + sum_i nll_weight_i *
    NLL_i`` (divided by N for ``reduction="mean"``). ``kl``: ``[N]`` fp32 per-row KL(q* || p_theta),
    unweighted and detached. ``nll``: ``[N]`` fp32 per-row NLL of ``targets`` (0 at ignored rows), unweighted
    and detached, or ``None`` without targets. ``entropy`` (``[N]`` fp32, the policy's entropy in nats, 0 at
    ignored rows) and ``is_top1`` (``[N]`` bool: the policy's most likely token is the target; False at ignored
    rows): with targets only, else ``None``. ``grad_stats``: ``[N, 3]`` fp32 with ``grad_stats=True`` (see
    :func:`fused_constraint_kl`), else ``None``.
    """

    loss: Tensor
    kl: Tensor
    nll: Tensor | None
    entropy: Tensor | None = None
    is_top1: Tensor | None = None
    grad_stats: Tensor | None = None


def fused_chunk_size(
    n_rows: int,
    *,
    vocab: int | None = None,
    max_chunk: int = 256,
    min_chunk: int = 16,
    whole_bytes: int = 64 * 2**20,
) -> int:
    """Default positions per chunk: ``n_rows / 16`` rounded up to a multiple of 8, within ``[min_chunk, max_chunk]``.

    The working set (three ``[chunk, V]`` fp32 tensors) then stays near 3/16 (about 0.19) of one ``[N, V]`` fp32
    tensor once ``N >= 16 * min_chunk``, while chunks stay large enough for efficient matmuls (at N = 1024 on CPU,
    64-row chunks ran the op 1.24x faster than 32-row ones, 2026-11-29; 128 rows would pass 0.25x). Small problems run
    in one chunk (up to ``max_chunk`` rows): when ``vocab`` is given and one ``[N, V]`` fp32 tensor takes at most
    ``whole_bytes`` (64 MiB), chunking saves little memory in absolute terms, while every chunk reads the
    ``[V, H]`` head weights again (the policy's, the guidance model's, and once more in the backward), which
    dominates on CPU for chunks of a few rows.
    """
    if vocab is not None and max(1, n_rows) * int(vocab) * 4 <= whole_bytes:
        return int(max(1, min(max_chunk, n_rows)))
    chunk = 8 * math.ceil(max(1, n_rows) / 128)
    return int(max(1, min(max_chunk, max(min_chunk, chunk))))


def _row_values(value, n: int, device, name: str) -> Tensor:
    """A per-row fp32 weight vector ``[n]`` from ``None`` (ones), a number, or a tensor of shape ``[n]``."""
    if value is None:
        return torch.ones(n, dtype=torch.float32, device=device)
    if isinstance(value, (int, float)):
        return torch.full((n,), float(value), dtype=torch.float32, device=device)
    value = torch.as_tensor(value, device=device).detach()
    if value.dim() == 0:
        return value.float().expand(n).contiguous()
    if value.shape != (n,):
        raise ValueError(f"{name} must be a number or a [N] = [{n}] tensor, got shape {tuple(value.shape)}")
    return value.float()


class _Head:
    """``x @ W.T + b`` in fp32 for one chunk, plus the matching gradient products.

    fp32 weights are used as they are. Lower-precision weights on CUDA use ``torch.mm(..., out_dtype=fp32)``
    (fp32 accumulation and output, no weight copy) where the build supports it; otherwise the weight is
    upcast once per call (a ``[V, H]`` fp32 copy).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach().float()
        self.mixed = weight.dtype != torch.float32 and weight.is_cuda and self._mm_out_dtype_works()
        if weight.dtype != torch.float32 and not self.mixed:
            self.weight = self.weight.float()

    def _mm_out_dtype_works(self) -> bool:
        try:
            probe = self.weight[:1]
            torch.mm(probe, probe.t(), out_dtype=torch.float32)
            return True
        except (RuntimeError, TypeError, NotImplementedError):
            return False

    def logits(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``[rows, V]`` fp32 logits, written into ``out`` (a ``[rows, V]`` fp32 buffer) when given (the
        mixed-precision CUDA path, which gets no buffer, allocates)."""
        if self.mixed:
            logits = torch.mm(x.to(self.weight.dtype), self.weight.t(), out_dtype=torch.float32)
            return logits.add_(self.bias) if self.bias is not None else logits
        if out is None:
            return F.linear(x.float(), self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x.float(), self.weight.t(), out=out)
        return torch.addmm(self.bias, x.float(), self.weight.t(), out=out)

    def input_grad(self, grad_logits: Tensor) -> Tensor:
        """``grad_logits @ W`` -> ``[rows, H]`` fp32."""
        if self.mixed:
            return torch.mm(grad_logits.to(self.weight.dtype), self.weight, out_dtype=torch.float32)
        return grad_logits @ self.weight


def _transform_(logits: Tensor, scale: float, softcap: float | None) -> Tensor:
    """The model's logit transform, in place: ``softcap * tanh(scale * x / softcap)`` (or ``scale * x``)."""
    if scale != 1.0:
        logits.mul_(scale)
    if softcap:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


class _Buffers(NamedTuple):
    kl_rows: Tensor
    nll_rows: Tensor
    entropy_rows: Tensor
    top1_rows: Tensor
    stats_rows: Tensor | None
    grad_h: Tensor | None
    grad_w: Tensor | None
    grad_b: Tensor | None


def _chunk(
    start: int,
    end: int,
    policy_hidden: Tensor,
    head: _Head,
    ref_hidden: Tensor | None,
    z_fn: ZFn,
    kl_weight: Tensor,
    targets: Tensor | None,
    nll_weight: Tensor | None,
    opts: dict,
    out: _Buffers,
    scratch: tuple[Tensor | None, Tensor | None, Tensor | None],
) -> None:
    """Rows ``start:end``: per-row KL (and NLL) into ``out``, and their gradients when ``out`` has buffers.

    On CPU it works in the three ``[chunk, V]`` fp32 ``scratch`` buffers (``logits``, ``work``, ``log_q``),
    allocated once per call and reused by every chunk, so no other ``[rows, V]`` tensor is allocated (fresh
    CPU buffers pay their page faults). On accelerators (``scratch`` all ``None``) the caching allocator reuses
    the freed blocks, and at most three ``[rows, V]`` fp32 tensors are alive at a time.
    """
    scale, softcap = opts["scale"], opts["softcap"]
    rows, vocab = end - start, head.weight.shape[0]
    k = max(0, min(end, opts["kl_rows"]) - start)  # the leading rows of this chunk that carry a KL
    a, b, c = (None if buffer is None else buffer[:rows] for buffer in scratch)
    x = policy_hidden[start:end]
    logits = _transform_(head.logits(x, out=a), scale, softcap)  # [c, V] fp32, the policy logits
    q = None
    if k > 0:
        b_k, c_k = (None if buffer is None else buffer[:k] for buffer in (b, c))
        # work = ref + logsigmoid(z); logsigmoid(z) = -logaddexp(-z, 0), in one buffer
        if getattr(z_fn, "writes_into", False):
            work = z_fn(start, start + k, out=b_k).neg_()
        else:
            z = z_fn(start, start + k)
            if z.shape != (k, vocab):
                raise ValueError(
                    f"z for rows {start}:{start + k} must be [{k}, {vocab}], got {tuple(z.shape)}"
                )
            work = torch.neg(z.float(), out=b_k)  # the caller's tensor is left as it is
        torch.logaddexp(work, work.new_zeros(()), out=work)
        work.neg_()
        if ref_hidden is None:
            work.add_(logits[:k])
        else:
            work.add_(_transform_(head.logits(ref_hidden[start : start + k], out=c_k), scale, softcap))
        log_q = torch.log_softmax(work, dim=-1, out=c_k).clamp_(min=_NEG)
        q = torch.exp(log_q, out=work)  # work = q*
        self_term = _row_dot(q, log_q)  # sum q log q
        # the log_q buffer (c) now holds log p (a fresh tensor off CPU when only some rows carry a KL)
        log_p = torch.log_softmax(logits, dim=-1, out=c if c is not None or k < rows else log_q)
    else:
        log_p = torch.log_softmax(logits, dim=-1, out=c)
    log_p = log_p.clamp_(min=_NEG)
    if q is not None:
        out.kl_rows[start : start + k] = self_term - _row_dot(q, log_p[:k])
    w_kl = kl_weight[start:end]
    w_nll = safe_t = lse = valid = None
    if targets is not None:
        t = targets[start:end]
        valid = t != opts["ignore_index"]
        safe_t = torch.where(valid, t, 0).unsqueeze(1)
        out.nll_rows[start:end] = torch.where(valid, -log_p.gather(1, safe_t).squeeze(1), 0.0)
        w_nll = torch.where(valid, nll_weight[start:end], 0.0)
        top_logit, top = logits.max(-1, keepdim=True)  # (faster than argmax on CPU)
        out.top1_rows[start:end] = (top.squeeze(1) == t) & valid
        lse = (top_logit - log_p.gather(1, top)).squeeze(1)  # log p is unclamped at the top token
    no_grad = out.grad_h is None and out.grad_w is None and out.grad_b is None
    if no_grad and lse is None:
        return
    grad = log_p.exp_()  # the log_q buffer now holds p
    if lse is not None:  # H(p) = logsumexp(logits) - sum_v p_v * logits_v
        out.entropy_rows[start:end] = torch.where(valid, lse - _row_dot(grad, logits), 0.0)
    if no_grad:
        return
    # d loss / d logits = (w_kl + w_nll) * p - w_kl * q* - w_nll * onehot(target), computed on the KL rows as
    # (w_kl + w_nll) * (p - q*) + w_nll * q* - w_nll * onehot (rows from k on have no KL: their w_kl is 0)
    if q is not None:
        diff = grad[:k].sub_(q)  # p - q*
        if out.stats_rows is not None and safe_t is not None:
            out.stats_rows[start : start + k] = _grad_stats(diff, q, safe_t[:k], valid[:k])
    grad.mul_((w_kl if w_nll is None else w_kl + w_nll).unsqueeze(1))
    if q is not None and w_nll is not None:
        grad[:k].add_(q.mul_(w_nll[:k].unsqueeze(1)))
    if w_nll is not None:
        grad.scatter_add_(1, safe_t, -w_nll.unsqueeze(1))
    if softcap:  # d/dx softcap * tanh(scale * x / softcap) = scale * (1 - tanh^2)
        factor = logits.div_(softcap).square_().neg_().add_(1.0)
        if scale != 1.0:
            factor.mul_(scale)
        grad.mul_(factor)
    elif scale != 1.0:
        grad.mul_(scale)
    if out.grad_h is not None:
        out.grad_h[start:end] = head.input_grad(grad)
    if out.grad_w is not None:
        out.grad_w.addmm_(grad.t(), x.float())
    if out.grad_b is not None:
        out.grad_b.add_(grad.sum(0))


def _grad_stats(diff: Tensor, q: Tensor, safe_t: Tensor, valid: Tensor) -> Tensor:
    """Per row ``[|p - q*|^2, |p - e_t|^2, <p - q*, p - e_t>]`` from ``diff = p - q*`` and ``q*`` (``[rows, 3]``):
    the unscaled KL and NLL gradients with respect to the logits, as the trainer's ``kl_grad_share`` needs them."""
    dd, dq, qq = _row_dot(diff, diff), _row_dot(diff, q), _row_dot(q, q)
    d_t, q_t = diff.gather(1, safe_t).squeeze(1), q.gather(1, safe_t).squeeze(1)
    lm_sq = dd + 2 * dq + qq - 2 * (d_t + q_t) + 1  # |p|^2 - 2 p_t + 1 with p = diff + q*
    stats = torch.stack([dd, lm_sq, dd + dq - d_t], 1)
    return torch.where(valid.unsqueeze(1), stats, 0.0)


class _FusedConstraintKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        policy_hidden: Tensor,
        head_weight: Tensor,
        head_bias: Tensor | None,
        ref_hidden: Tensor | None,
        z_fn: ZFn,
        kl_weight: Tensor,
        targets: Tensor | None,
        nll_weight: Tensor | None,
        opts: dict,
    ):
        n = policy_hidden.shape[0]
        vocab = head_weight.shape[0]
        device = policy_hidden.device
        chunk, want = opts["chunk_size"], opts["want_grad"]
        need_h = want and ctx.needs_input_grad[0]
        need_w = want and ctx.needs_input_grad[1]
        need_b = want and head_bias is not None and ctx.needs_input_grad[2]
        head = _Head(head_weight, head_bias)
        grad_h = torch.zeros(policy_hidden.shape, dtype=torch.float32, device=device) if need_h else None
        grad_w = torch.zeros(head_weight.shape, dtype=torch.float32, device=device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
        kl_rows = torch.zeros(n, dtype=torch.float32, device=device)
        stat_rows = n if targets is not None else 0
        nll_rows = torch.zeros(stat_rows, dtype=torch.float32, device=device)
        entropy_rows = torch.zeros(stat_rows, dtype=torch.float32, device=device)
        top1_rows = torch.zeros(stat_rows, dtype=torch.bool, device=device)
        grad_stats = torch.zeros(n, 3, dtype=torch.float32, device=device) if opts["grad_stats"] else None

        buffers = _Buffers(kl_rows, nll_rows, entropy_rows, top1_rows, grad_stats, grad_h, grad_w, grad_b)
        scratch = (None, None, None)
        if device.type in _SCRATCH_DEVICES:
            scratch = tuple(
                torch.empty(min(chunk, n), vocab, dtype=torch.float32, device=device) for _ in range(3)
            )
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, n, chunk):  # on CPU every chunk works in the same scratch buffers
                _chunk(
                    start,
                    min(start + chunk, n),
                    policy_hidden,
                    head,
                    ref_hidden,
                    z_fn,
                    kl_weight,
                    targets,
                    nll_weight,
                    opts,
                    buffers,
                    scratch,
                )

        loss = (kl_rows * kl_weight).sum()
        if targets is not None:
            valid = targets != opts["ignore_index"]
            loss = loss + torch.where(valid, nll_rows * nll_weight, 0.0).sum()
        factor = 1.0 / max(n, 1) if opts["mean"] else 1.0
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.factor = factor
        ctx.dtypes = (policy_hidden.dtype, head_weight.dtype, None if head_bias is None else head_bias.dtype)
        ctx.mark_non_differentiable(kl_rows, nll_rows, entropy_rows, top1_rows)
        if grad_stats is None:
            return loss * factor, kl_rows, nll_rows, entropy_rows, top1_rows
        ctx.mark_non_differentiable(grad_stats)
        return loss * factor, kl_rows, nll_rows, entropy_rows, top1_rows, grad_stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_grad_stats):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "fused_constraint_kl: backward ran twice through the same graph; recompute the loss instead of "
                "using retain_graph=True"
            )
        ctx.grads = None  # hand the buffers to autograd without a copy
        factor = grad_loss.float() * ctx.factor
        out = []
        for grad, dtype in zip(grads, ctx.dtypes):
            if grad is None:
                out.append(None)
                continue
            grad.mul_(factor)
            out.append(grad if grad.dtype == dtype else grad.to(dtype))
        return out[0], out[1], out[2], None, None, None, None, None, None


def fused_constraint_kl(
    policy_hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None = None,
    guidance_hidden: Tensor | ZFn | None = None,
    guidance_weight: Tensor | None = None,
    guidance_bias: Tensor | None = None,
    *,
    reference: str | Tensor = "policy",
    row_weight: Tensor | float | None = None,
    targets: Tensor | None = None,
    nll_weight: Tensor | float | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
    reduction: str = "sum",
    kl_rows: int | None = None,
    grad_stats: bool = False,
) -> FusedKLOutput:
    """KL(q* || p_theta) (and optionally the NLL of ``targets``) from hidden states, chunk by chunk.

    Args:
        policy_hidden: ``[N, H]`` last hidden states of the policy at the counted positions (any float dtype;
            receives a gradient when it requires one).
        head_weight, head_bias: the policy's output head, ``[V, H]`` and ``[V]`` (or ``None``); each gets a
            gradient only when it requires one (a frozen head costs no weight-gradient matmul).
        guidance_hidden: ``[K, Hg]`` guidance hidden states at the first ``K = kl_rows`` positions, projected by
            ``guidance_weight [V, Hg]`` / ``guidance_bias [V]`` (fp32, no gradient); or a callable
            ``z_fn(start, end) -> [end - start, V]`` giving ``z`` for rows ``start:end < K`` (then the guidance
            weight and bias must be ``None``).
        reference: ``"policy"`` (the detached policy logits) or the ``[K, H]`` hidden states of the reference
            model (e.g. the base with adapters disabled), projected by the same head and transform.
        row_weight: per-row weight of the KL (``[N]``, a number, or ``None`` = 1 on the ``kl_rows``); 0 drops a
            row (padding).
            Put coefficients and denominators here to combine several position sets in one pass.
        targets: ``[N]`` target ids for the NLL (``ignore_index`` rows are skipped), or ``None``.
        nll_weight: per-row weight of the NLL (``[N]``, a number, or ``None`` = 1).
        logit_scale, logit_softcap: the transform the model applies to the head output
            (``softcap * tanh(scale * x / softcap)``), as :func:`steer.guidance.constraint_kl.logit_transform` reads them.
        chunk_size: positions per chunk (default :func:`fused_chunk_size` of N and V); the working set is
            about three ``[chunk_size, V]`` fp32 tensors.
        reduction: ``"sum"`` or ``"mean"`` (the weighted sum divided by N).
        kl_rows: ``K``, how many leading rows carry a KL (default N). The rows after them are NLL-only rows
            (their ``row_weight`` must be 0): no ``z``, reference or ``q*`` is computed for them and their ``kl``
            is reported as 0, so a caller that puts its KL rows first pays the guidance model (and the base
            reference) only where the KL counts.
        grad_stats: also return, per row, the squared norms of the unscaled KL and NLL gradients with respect
            to the logits and their dot product, ``[|p - q*|^2, |p - e_t|^2, <p - q*, p - e_t>]`` (``[N, 3]``;
            0 on rows without a KL or a target, and all 0 when no gradient is computed). For logging the KL's
            share of the gradient at no extra head pass.

    Returns:
        :class:`FusedKLOutput` ``(loss, kl, nll, entropy, is_top1)``; only ``loss`` is differentiable. Calling ``backward``
        twice through the same graph raises (the gradients are handed to autograd without a copy).
    """
    if policy_hidden.dim() != 2:
        raise ValueError(f"policy_hidden must be [N, H], got shape {tuple(policy_hidden.shape)}")
    n, hidden = policy_hidden.shape
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden:
        raise ValueError(f"head_weight must be [V, {hidden}], got shape {tuple(head_weight.shape)}")
    vocab = head_weight.shape[0]
    if head_bias is not None and head_bias.shape != (vocab,):
        raise ValueError(f"head_bias must be [{vocab}], got shape {tuple(head_bias.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if chunk_size is None:
        chunk_size = fused_chunk_size(n, vocab=vocab)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")
    device = policy_hidden.device
    n_kl = n if kl_rows is None else int(kl_rows)
    if not 0 <= n_kl <= n:
        raise ValueError(f"kl_rows must be in [0, N] = [0, {n}], got {kl_rows}")

    if callable(guidance_hidden) and not isinstance(guidance_hidden, Tensor):
        if guidance_weight is not None or guidance_bias is not None:
            raise ValueError("with a z_fn callable, guidance_weight and guidance_bias must be None")
        z_fn = guidance_hidden
    elif isinstance(guidance_hidden, Tensor):
        if guidance_weight is None:
            raise ValueError("guidance_hidden needs guidance_weight (the guidance head, [V, Hg])")
        if guidance_hidden.dim() != 2 or guidance_hidden.shape[0] != n_kl:
            raise ValueError(
                f"guidance_hidden must be [{n_kl}, Hg], got shape {tuple(guidance_hidden.shape)}"
            )
        if guidance_weight.shape != (vocab, guidance_hidden.shape[1]):
            raise ValueError(
                f"guidance_weight must be [{vocab}, {guidance_hidden.shape[1]}], got {tuple(guidance_weight.shape)}"
            )
        if guidance_bias is not None and guidance_bias.shape != (vocab,):
            raise ValueError(f"guidance_bias must be [{vocab}], got shape {tuple(guidance_bias.shape)}")
        g_hidden, g_head = guidance_hidden.detach(), _Head(guidance_weight, guidance_bias)

        def z_fn(start: int, end: int, out: Tensor | None = None) -> Tensor:
            return g_head.logits(g_hidden[start:end], out=out)

        z_fn.writes_into = True  # the chunk may pass its scratch buffer (and work in the result in place)
    else:
        raise ValueError("guidance_hidden must be a [N, Hg] tensor or a z_fn(start, end) callable")

    if isinstance(reference, str):
        if reference != "policy":
            raise ValueError(
                f"reference must be 'policy' or a [N, H] tensor of hidden states, got {reference!r}"
            )
        ref_hidden = None
    elif isinstance(reference, Tensor):
        if reference.shape != (n_kl, hidden):
            raise ValueError(
                f"reference hidden states must be [{n_kl}, {hidden}], got shape {tuple(reference.shape)}"
            )
        ref_hidden = reference.detach()
    else:
        raise ValueError(f"reference must be 'policy' or a tensor, got {type(reference).__name__}")

    kl_weight = _row_values(row_weight, n, device, "row_weight")
    if row_weight is None:
        kl_weight[n_kl:] = 0.0
    elif n_kl < n and bool(kl_weight[n_kl:].ne(0).any()):
        raise ValueError(f"row_weight must be 0 on the rows from kl_rows={n_kl} on (they carry no KL)")
    nll_w = None
    if targets is not None:
        if targets.shape != (n,):
            raise ValueError(f"targets must be [{n}], got shape {tuple(targets.shape)}")
        targets = targets.to(device=device, dtype=torch.long)
        nll_w = _row_values(nll_weight, n, device, "nll_weight")
        valid = targets != ignore_index
        if bool(((targets < 0) | (targets >= vocab))[valid].any()):
            raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}")
    elif nll_weight is not None:
        raise ValueError("nll_weight needs targets")

    params = (policy_hidden, head_weight, head_bias)
    want_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    opts = {
        "scale": float(logit_scale),
        "softcap": None if not logit_softcap else float(logit_softcap),
        "chunk_size": int(chunk_size),
        "mean": reduction == "mean",
        "ignore_index": int(ignore_index),
        "want_grad": want_grad,
        "kl_rows": n_kl,
        "grad_stats": bool(grad_stats),
    }
    loss, kl_rows, nll_rows, entropy_rows, top1_rows, *stats = _FusedConstraintKL.apply(
        policy_hidden, head_weight, head_bias, ref_hidden, z_fn, kl_weight, targets, nll_w, opts
    )
    stats = stats[0] if stats else None
    if targets is None:
        return FusedKLOutput(loss, kl_rows, None, grad_stats=stats)
    return FusedKLOutput(loss, kl_rows, nll_rows, entropy_rows, top1_rows, stats)


class FusedConstraintKL(nn.Module):
    """Module form of :func:`fused_constraint_kl` holding the head transform and the chunk size.

    ``FusedConstraintKL(logit_scale=..., logit_softcap=...)(policy_hidden, lm_head, guidance_hidden,
    guidance_head, ...)`` takes the heads as ``nn.Linear``-like modules (``weight`` and optional ``bias``); a
    :class:`~steer.guidance.head.GuidanceHead` with a shared logit or a token term computes its own ``z``.
    """

    def __init__(
        self,
        *,
        logit_scale: float = 1.0,
        logit_softcap: float | None = None,
        chunk_size: int | None = None,
        reduction: str = "sum",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.logit_scale = logit_scale
        self.logit_softcap = logit_softcap
        self.chunk_size = chunk_size
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(
        self,
        policy_hidden: Tensor,
        head: nn.Module,
        guidance_hidden: Tensor | ZFn,
        guidance_head: nn.Module | None = None,
        *,
        reference: str | Tensor = "policy",
        row_weight: Tensor | float | None = None,
        targets: Tensor | None = None,
        nll_weight: Tensor | float | None = None,
        kl_rows: int | None = None,
        grad_stats: bool = False,
    ) -> FusedKLOutput:
        guidance_weight = None if guidance_head is None else guidance_head.weight
        guidance_bias = None if guidance_head is None else getattr(guidance_head, "bias", None)
        if isinstance(guidance_hidden, Tensor) and has_context_terms(guidance_head):
            # a GuidanceHead with a shared logit or a token term: z from the head itself, chunk by chunk
            g_hidden = guidance_hidden.detach()

            def z_fn(start: int, end: int) -> Tensor:
                return guidance_head(g_hidden[start:end].float())

            guidance_hidden, guidance_weight, guidance_bias = z_fn, None, None
        return fused_constraint_kl(
            policy_hidden,
            head.weight,
            getattr(head, "bias", None),
            guidance_hidden,
            guidance_weight,
            guidance_bias,
            reference=reference,
            row_weight=row_weight,
            targets=targets,
            nll_weight=nll_weight,
            ignore_index=self.ignore_index,
            logit_scale=self.logit_scale,
            logit_softcap=self.logit_softcap,
            chunk_size=self.chunk_size,
            reduction=self.reduction,
            kl_rows=kl_rows,
            grad_stats=grad_stats,
        )

    def extra_repr(self) -> str:
        return (
            f"logit_scale={self.logit_scale}, logit_softcap={self.logit_softcap}, chunk_size={self.chunk_size}, "
            f"reduction={self.reduction!r}"
        )
