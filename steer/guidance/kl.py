"""The NADO target distribution q* and the closed-form constraint KL(q* || p_theta).

``log q*(v | x<t) = log_softmax(ref_logits + logsigmoid(z))`` where ``R = sigmoid(z)`` is the guidance
model's estimate of P(constraint satisfied | x<t, x_t = v). All vocabulary-wide arithmetic runs in fp32.

:func:`constraint_kl` sums the KL exactly over the vocabulary at each counted position. It works on
the counted positions only, a chunk of positions at a time, and computes the gradient with respect to
the policy logits (``softmax(policy) - q*``) during the forward pass into a single buffer that the
backward pass hands straight to autograd. Peak extra memory is therefore one ``[B, T, V]`` gradient
buffer (which any implementation needs, and which doubles as work space) plus about one ``[chunk, V]``
fp32 tensor, instead of the several ``[B, T, V]`` tensors that autograd through ``log_softmax`` keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["constraint_kl", "constraint_kl_naive", "guided_log_probs"]


def guided_log_probs(ref_logits: Tensor, z: Tensor) -> Tensor:
    """``log q* = log_softmax(ref_logits + logsigmoid(z))`` over the last dimension, in fp32."""
    if ref_logits.shape != z.shape:
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} and z {tuple(z.shape)} must have the same shape"
        )
    return torch.log_softmax(ref_logits.float() + F.logsigmoid(z.float()), dim=-1)


def _check_inputs(
    policy_logits: Tensor, ref_logits: Tensor, z: Tensor, mask: Tensor | None, reduction: str
) -> Tensor:
    if policy_logits.dim() != 3:
        raise ValueError(f"policy_logits must be [B, T, V], got shape {tuple(policy_logits.shape)}")
    for name, tensor in (("ref_logits", ref_logits), ("z", z)):
        if tensor.shape != policy_logits.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but policy_logits has {tuple(policy_logits.shape)}"
            )
    if mask is None:
        mask = torch.ones(policy_logits.shape[:2], dtype=torch.bool, device=policy_logits.device)
    if mask.shape != policy_logits.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(policy_logits.shape[:2])}, got {tuple(mask.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return mask.to(device=policy_logits.device, dtype=torch.bool)


def constraint_kl_naive(
    policy_logits: Tensor,
    ref_logits: Tensor,
    z: Tensor,
    mask: Tensor | None,
    *,
    chunk_size: int = 256,
    reduction: str = "mean",
) -> Tensor:
    """Full-tensor reference for :func:`constraint_kl` (plain autograd; ``chunk_size`` is ignored)."""
    del chunk_size
    mask = _check_inputs(policy_logits, ref_logits, z, mask, reduction)
    log_q = guided_log_probs(ref_logits.detach(), z.detach())
    log_p = torch.log_softmax(policy_logits.float(), dim=-1)
    per_position = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    total = per_position[mask].sum()
    if reduction == "mean":
        total = total / mask.sum().clamp(min=1)
    return total


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of two ``[rows, V]`` tensors without a ``[rows, V]`` temporary.

    On CPU one BLAS dot per row (a batched ``[1, V] x [V, 1]`` product is several times slower there); on
    accelerators one batched matmul. The fused KL (:mod:`steer.guidance.fused_kl`) uses it too.
    """
    if a.device.type == "cpu":
        if a.shape[0] == 0:
            return a.new_zeros(0)
        return torch.stack([torch.dot(x, y) for x, y in zip(a, b)])
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _chunk_kl(
    policy: Tensor, ref: Tensor, z: Tensor, grad_out: Tensor | None, scale: float = 1.0, safe: bool = False
) -> Tensor:
    """KL(q* || softmax(policy)) per row of a chunk; writes ``scale * (softmax(policy) - q*)`` into ``grad_out``.

    ``grad_out`` (same shape as ``policy``, any float dtype) may be a view into the gradient buffer; when it is
    fp32 it doubles as work space (log q*, then log p, then the gradient), so the chunk needs one extra
    ``[rows, V]`` fp32 tensor at a time. ``safe`` treats ``0 * log 0`` as 0 (only needed for ``-inf`` logits).
    """
    if grad_out is not None and grad_out.dtype == torch.float32:
        work = grad_out
    else:
        work = torch.empty(policy.shape, dtype=torch.float32, device=policy.device)
    # logsigmoid(z) = -logaddexp(-z, 0), computed in one buffer (F.logsigmoid also allocates a second one on CPU)
    tmp = z.float().neg() if z.dtype == torch.float32 else z.float().neg_()
    torch.logaddexp(tmp, tmp.new_zeros(()), out=tmp)
    tmp.neg_().add_(ref)  # ref is promoted to fp32 by the in-place add
    torch.log_softmax(tmp, dim=-1, out=work)  # work = log q*
    del tmp
    q = work.exp()
    kl = torch.where(q > 0, q * work, 0.0).sum(-1) if safe else _row_dot(q, work)  # sum q log q
    torch.log_softmax(policy.float(), dim=-1, out=work)  # work = log p
    cross = torch.where(q > 0, q * work, 0.0).sum(-1) if safe else _row_dot(q, work)  # sum q log p
    if grad_out is not None:
        work.exp_().sub_(q)
        if scale != 1.0:
            work.mul_(scale)
        if work is not grad_out:
            grad_out.copy_(work)
    return kl - cross


def _row_slices(mask: Tensor, chunk_size: int) -> list[tuple[int, int, int]] | None:
    """Split the counted positions into ``(b, start, end)`` runs of at most ``chunk_size`` positions.

    Each run is a contiguous slice of one sequence, so it is a view even when the logits are a
    non-contiguous slice such as ``logits[:, :-1]``. Returns ``None`` when the mask is so fragmented that
    gathering positions is cheaper than many small slices.
    """
    batch_idx, pos_idx = mask.nonzero(as_tuple=True)
    count = batch_idx.numel()
    if count == 0:
        return []
    flat = batch_idx * (mask.shape[1] + 2) + pos_idx  # a gap between sequences breaks every run
    breaks = (flat[1:] - flat[:-1] != 1).nonzero().view(-1) + 1
    if breaks.numel() > 2 * (count // chunk_size + 1) + 16 + mask.shape[0]:
        return None
    first = torch.cat([breaks.new_zeros(1), breaks])
    last = torch.cat([breaks - 1, breaks.new_full((1,), count - 1)])
    slices = []
    for b, start, end in zip(
        batch_idx[first].tolist(), pos_idx[first].tolist(), (pos_idx[last] + 1).tolist()
    ):
        slices.extend((b, s, min(s + chunk_size, end)) for s in range(start, end, chunk_size))
    return slices


class _ConstraintKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logits, ref_logits, z, mask, chunk_size: int, scale_mean: bool, want_grad: bool):
        count = int(mask.sum())
        need_grad = want_grad and ctx.needs_input_grad[0]
        grad = None
        if need_grad:
            alloc = torch.empty if count == mask.numel() else torch.zeros
            grad = alloc(policy_logits.shape, dtype=policy_logits.dtype, device=policy_logits.device)
        # fp32 gradients are scaled once in backward; lower precision ones before the cast.
        scale = 1.0 / max(count, 1) if scale_mean else 1.0
        chunk_scale = 1.0 if grad is None or grad.dtype == torch.float32 else scale
        slices = _row_slices(mask, chunk_size)

        def run(safe: bool) -> Tensor:
            total = torch.zeros((), dtype=torch.float32, device=policy_logits.device)
            if slices is not None:
                for b, start, end in slices:
                    out = grad[b, start:end] if grad is not None else None
                    part = _chunk_kl(
                        policy_logits[b, start:end],
                        ref_logits[b, start:end],
                        z[b, start:end],
                        out,
                        chunk_scale,
                        safe,
                    )
                    total += part.sum()
                return total
            # Fragmented mask: gather positions (a third of the chunk, as three inputs are gathered at once).
            batch_idx, pos_idx = mask.nonzero(as_tuple=True)
            step = max(1, chunk_size // 3)
            for first in range(0, batch_idx.numel(), step):
                index = (batch_idx[first : first + step], pos_idx[first : first + step])
                out = None
                if grad is not None:
                    out = torch.empty(
                        (index[0].numel(), grad.shape[-1]), dtype=grad.dtype, device=grad.device
                    )
                gathered = (policy_logits[index], ref_logits[index], z[index])
                total += _chunk_kl(*gathered, out, chunk_scale, safe).sum()
                del gathered
                if out is not None:
                    grad[index] = out
                del out
            return total

        total = run(safe=False)
        if not torch.isfinite(total):  # -inf logits: 0 * log 0 gave NaN somewhere; redo with 0 * log 0 := 0
            total = run(safe=True)
        ctx.grad_buffer = grad
        ctx.backward_scale = scale / chunk_scale
        return total * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad = ctx.grad_buffer
        if grad is None:
            if ctx.needs_input_grad[0]:
                raise RuntimeError(
                    "constraint_kl: backward ran twice through the same graph; recompute the loss instead of "
                    "using retain_graph=True"
                )
            return (None,) * 7
        ctx.grad_buffer = None  # hand the buffer to autograd without a copy
        factor = grad_output * ctx.backward_scale
        if not bool(factor == 1):
            grad.mul_(factor.to(grad.dtype))
        return grad, None, None, None, None, None, None


def constraint_kl(
    policy_logits: Tensor,
    ref_logits: Tensor,
    z: Tensor,
    mask: Tensor | None,
    *,
    chunk_size: int = 256,
    reduction: str = "mean",
) -> Tensor:
    """KL(q* || p_theta) summed exactly over the vocabulary at each position where ``mask`` is True.

    Args:
        policy_logits: ``[B, T, V]`` logits of the trained policy (any float dtype); the only input that
            receives a gradient.
        ref_logits: ``[B, T, V]`` logits of the reference distribution p (detached inside).
        z: ``[B, T, V]`` guidance logits, ``R = sigmoid(z)`` (detached inside).
        mask: ``[B, T]`` bool, which next-token distributions count (``None``: all). Logits at position t
            predict token t+1; the caller shifts.
        chunk_size: positions processed at a time; the working set is a few ``[chunk_size, V]`` fp32 tensors.
        reduction: ``"mean"`` over counted positions (0 when there are none) or ``"sum"``.
    """
    mask = _check_inputs(policy_logits, ref_logits, z, mask, reduction)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    want_grad = torch.is_grad_enabled() and policy_logits.requires_grad
    return _ConstraintKL.apply(
        policy_logits, ref_logits.detach(), z.detach(), mask, int(chunk_size), reduction == "mean", want_grad
    )
