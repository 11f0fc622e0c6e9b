"""The fused head + constraint KL (+ NLL) against materialised-logit references (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from steer.guidance import (
    FusedConstraintKL,
    constraint_kl,
    constraint_kl_naive,
    fused_chunk_size,
    fused_constraint_kl,
    guided_log_probs,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
TRANSFORMS = [(1.0, None), (0.37, None), (1.0, 2.5), (1.7, 4.0)]  # (logit_scale, logit_softcap)


def _setup(n=11, hidden=8, vocab=37, g_hidden=6, *, bias=True, seed=0, scale=1.5):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return torch.randn(*shape, generator=gen) * s

    return {
        "h": randn(n, hidden, s=scale),
        "w": randn(vocab, hidden, s=0.7),
        "b": randn(vocab) if bias else None,
        "ref_h": randn(n, hidden, s=scale),
        "g": randn(n, g_hidden),
        "gw": randn(vocab, g_hidden, s=0.8),
        "gb": randn(vocab),
    }


def _transform(logits, scale, softcap):
    logits = logits * scale
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _leaves(t, *, weight_grad=True, bias_grad=True):
    h = t["h"].clone().requires_grad_(True)
    w = t["w"].clone().requires_grad_(weight_grad)
    b = None if t["b"] is None else t["b"].clone().requires_grad_(bias_grad)
    return h, w, b


def _grads(*tensors):
    return [None if x is None else x.grad for x in tensors]


def _materialised(t, h, w, b, *, scale=1.0, softcap=None, reference="policy"):
    """Policy logits (with autograd), reference logits and z, all ``[N, V]``."""
    logits = _transform(F.linear(h, w, b), scale, softcap)
    if reference == "policy":
        ref = logits.detach()
    else:
        ref = _transform(F.linear(t["ref_h"], w.detach(), None if b is None else b.detach()), scale, softcap)
    z = F.linear(t["g"], t["gw"], t["gb"])
    return logits, ref, z


def _per_row_kl(logits, ref, z):
    log_q = guided_log_probs(ref, z)
    return F.kl_div(torch.log_softmax(logits.float(), -1), log_q, reduction="none", log_target=True).sum(-1)


def _fused(t, h, w, b, **kwargs):
    ref = kwargs.pop("reference", "policy")
    reference = t["ref_h"] if ref == "base" else "policy"
    return fused_constraint_kl(h, w, b, t["g"], t["gw"], t["gb"], reference=reference, **kwargs)


# ------------------------------------------------------------------------------------------ KL only
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("reference", ["policy", "base"])
@pytest.mark.parametrize("scale,softcap", TRANSFORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_kl_and_grads_match_naive_reference(chunk_size, reference, scale, softcap, bias):
    t = _setup(bias=bias)
    h, w, b = _leaves(t)
    out = _fused(
        t, h, w, b, reference=reference, logit_scale=scale, logit_softcap=softcap, chunk_size=chunk_size
    )
    assert out.nll is None and out.kl.shape == (11,) and not out.kl.requires_grad
    out.loss.backward()
    fused_grads = _grads(h, w, b)

    h2, w2, b2 = _leaves(t)
    logits, ref, z = _materialised(t, h2, w2, b2, scale=scale, softcap=softcap, reference=reference)
    expected = constraint_kl_naive(logits[None], ref[None], z[None], None, reduction="sum")
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach(), **TOL)
    torch.testing.assert_close(out.kl, _per_row_kl(logits, ref, z).detach(), **TOL)
    for got, want in zip(fused_grads, _grads(h2, w2, b2)):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **TOL)


def test_padded_batch_matches_chunked_constraint_kl():
    """Hidden states ``[B, T, H]`` with a padded mask: the fused op on ``hidden[mask]`` equals constraint_kl."""
    gen = torch.Generator().manual_seed(3)
    batch, length, hidden, vocab = 3, 9, 8, 29
    states = torch.randn(batch, length, hidden, generator=gen)
    g_states = torch.randn(batch, length, 5, generator=gen)
    w, b = torch.randn(vocab, hidden, generator=gen), torch.randn(vocab, generator=gen)
    gw, gb = torch.randn(vocab, 5, generator=gen), torch.randn(vocab, generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, 2:7], mask[1, 4:9], mask[2, 1:3] = True, True, True  # prompts, continuations, right padding

    leaf = states.clone().requires_grad_(True)
    out = fused_constraint_kl(leaf[mask], w, b, g_states[mask], gw, gb, chunk_size=3, logit_softcap=3.0)
    out.loss.backward()

    leaf2 = states.clone().requires_grad_(True)
    logits = _transform(F.linear(leaf2, w, b), 1.0, 3.0)
    z = F.linear(g_states, gw, gb)
    expected = constraint_kl(logits, logits.detach(), z, mask, chunk_size=2, reduction="sum")
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach(), **TOL)
    torch.testing.assert_close(leaf.grad, leaf2.grad, **TOL)
    assert (leaf.grad[~mask] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_row_weights_combine_two_position_sets_in_one_pass(chunk_size):
    """Corpus and sample rows with their own coefficient / denominator, padding rows at weight 0."""
    t = _setup(n=14)
    corpus = torch.zeros(14, dtype=torch.bool)
    corpus[:6] = True
    samples = torch.zeros(14, dtype=torch.bool)
    samples[6:11] = True  # rows 11..13: padding
    weight = corpus.float() * (0.8 / 6.0) + samples.float() * (0.3 / 5.0)
    h, w, b = _leaves(t)
    out = _fused(t, h, w, b, row_weight=weight, chunk_size=chunk_size, logit_scale=0.5, logit_softcap=6.0)
    out.loss.backward()

    h2, w2, b2 = _leaves(t)
    logits, ref, z = _materialised(t, h2, w2, b2, scale=0.5, softcap=6.0)
    terms = [
        constraint_kl(logits[rows][None], ref[rows][None], z[rows][None], None, chunk_size=2, reduction="sum")
        for rows in (corpus, samples)
    ]
    expected = 0.8 * terms[0] / 6.0 + 0.3 * terms[1] / 5.0
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach(), **TOL)
    for got, want in zip(_grads(h, w, b), _grads(h2, w2, b2)):
        torch.testing.assert_close(got, want, **TOL)
    assert (h.grad[11:] == 0).all()
    torch.testing.assert_close(out.kl[corpus].sum(), terms[0].detach(), **TOL)  # unweighted per-row values


def test_mean_reduction_and_upstream_gradient_scaling():
    t = _setup()
    h, w, b = _leaves(t)
    out = _fused(t, h, w, b, reduction="mean", chunk_size=4)
    (out.loss * 3.5).backward()
    h2, w2, b2 = _leaves(t)
    logits, ref, z = _materialised(t, h2, w2, b2)
    expected = constraint_kl_naive(logits[None], ref[None], z[None], None, reduction="mean")
    (expected * 3.5).backward()
    torch.testing.assert_close(out.loss, expected.detach(), **TOL)
    for got, want in zip(_grads(h, w, b), _grads(h2, w2, b2)):
        torch.testing.assert_close(got, want, **TOL)


def test_zero_guidance_gives_zero_kl_and_gradient():
    t = _setup()
    h, w, b = _leaves(t)
    out = fused_constraint_kl(h, w, b, lambda s, e: torch.zeros(e - s, 37), chunk_size=5)
    out.loss.backward()
    assert float(out.loss.detach().abs()) < 1e-5
    assert float(h.grad.abs().max()) < 1e-5


def test_z_callable_matches_guidance_head():
    t = _setup()
    z = F.linear(t["g"], t["gw"], t["gb"])
    calls = []

    def z_fn(start, end):
        calls.append((start, end))
        return z[start:end]

    h, w, b = _leaves(t)
    out = fused_constraint_kl(h, w, b, z_fn, chunk_size=4)
    out.loss.backward()
    h2, w2, b2 = _leaves(t)
    out2 = _fused(t, h2, w2, b2, chunk_size=4)
    out2.loss.backward()
    assert calls == [(0, 4), (4, 8), (8, 11)]
    torch.testing.assert_close(out.loss, out2.loss.detach(), **TOL)
    torch.testing.assert_close(h.grad, h2.grad, **TOL)
    torch.testing.assert_close(z, F.linear(t["g"], t["gw"], t["gb"]))  # z_fn's tensor is not modified


def test_minus_inf_guidance_bias_stays_finite_and_matches_safe_reference():
    """Tokens with R = 0 (z = -inf) have q* = 0: 0 log 0 counts as 0, as in constraint_kl's safe path."""
    t = _setup()
    t["gb"][[0, 5, 9]] = float("-inf")
    h, w, b = _leaves(t)
    out = _fused(t, h, w, b, chunk_size=3)
    out.loss.backward()
    h2, w2, b2 = _leaves(t)
    logits, ref, z = _materialised(t, h2, w2, b2)
    expected = constraint_kl(logits[None], ref[None], z[None], None, reduction="sum")
    expected.backward()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, expected.detach(), **TOL)
    torch.testing.assert_close(h.grad, h2.grad, **TOL)
    torch.testing.assert_close(w.grad, w2.grad, **TOL)


# ------------------------------------------------------------------------------------------ NLL
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (1.7, 4.0)])
def test_nll_equals_cross_entropy_and_shares_the_pass(chunk_size, scale, softcap):
    t = _setup()
    targets = torch.randint(0, 37, (11,), generator=torch.Generator().manual_seed(5))
    targets[[2, 7]] = -100
    h, w, b = _leaves(t)
    out = _fused(t, h, w, b, targets=targets, chunk_size=chunk_size, logit_scale=scale, logit_softcap=softcap)
    out.loss.backward()

    h2, w2, b2 = _leaves(t)
    logits, ref, z = _materialised(t, h2, w2, b2, scale=scale, softcap=softcap)
    nll = F.cross_entropy(logits, targets, reduction="sum")
    kl = constraint_kl_naive(logits[None], ref[None], z[None], None, reduction="sum")
    (kl + nll).backward()
    torch.testing.assert_close(out.nll.sum(), nll.detach(), **TOL)
    assert (out.nll[[2, 7]] == 0).all()
    torch.testing.assert_close(out.loss, (kl + nll).detach(), **TOL)
    for got, want in zip(_grads(h, w, b), _grads(h2, w2, b2)):
        torch.testing.assert_close(got, want, **TOL)


def test_weighted_sft_plus_kl_in_one_pass():
    """The trainer's loss: NLL / n_tokens + λ · KL / n_tokens from one head pass."""
    t = _setup()
    targets = torch.randint(0, 37, (11,), generator=torch.Generator().manual_seed(6))
    targets[-3:] = -100  # rows that only the KL counts (e.g. policy samples)
    kl_weight = torch.full((11,), 0.4 / 8)
    kl_weight[0] = 0.0  # a row only the NLL counts
    h, w, b = _leaves(t)
    out = _fused(t, h, w, b, targets=targets, row_weight=kl_weight, nll_weight=1 / 8, chunk_size=3)
    out.loss.backward()

    h2, w2, b2 = _leaves(t)
    logits, ref, z = _materialised(t, h2, w2, b2)
    nll = F.cross_entropy(logits, targets, reduction="sum") / 8
    kl = 0.4 * constraint_kl_naive(logits[1:][None], ref[1:][None], z[1:][None], None, reduction="sum") / 8
    (kl + nll).backward()
    torch.testing.assert_close(out.loss, (kl + nll).detach(), **TOL)
    for got, want in zip(_grads(h, w, b), _grads(h2, w2, b2)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
@pytest.mark.parametrize("reference", ["policy", "base"])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (1.7, 4.0)])
def test_kl_rows_first_then_nll_only_rows(chunk_size, reference, scale, softcap):
    """``kl_rows=K``: z and the reference only for the first K rows, the rest NLL-only; equal to the full pass."""
    t = _setup()
    k = 7  # chunk 3 and 4 leave a chunk that mixes KL and NLL-only rows
    targets = torch.randint(0, 37, (11,), generator=torch.Generator().manual_seed(8))
    targets[[1, 9]] = -100
    kl_weight = torch.full((11,), 0.3)
    kl_weight[k:] = 0.0
    kl_weight[2] = 0.0  # a zero weight inside the KL rows stays allowed
    opts = dict(targets=targets, row_weight=kl_weight, nll_weight=0.5, chunk_size=chunk_size)
    opts.update(logit_scale=scale, logit_softcap=softcap)
    ref_h = t["ref_h"][:k] if reference == "base" else "policy"
    calls = []

    def z_fn(start, end):
        calls.append((start, end))
        return F.linear(t["g"][start:end], t["gw"], t["gb"])

    h, w, b = _leaves(t)
    cut = fused_constraint_kl(h, w, b, z_fn, reference=ref_h, kl_rows=k, **opts)
    cut.loss.backward()
    assert calls and max(end for _, end in calls) <= k
    assert (cut.kl[k:] == 0).all()

    h2, w2, b2 = _leaves(t)
    full = _fused(t, h2, w2, b2, reference=reference, **opts)
    full.loss.backward()
    torch.testing.assert_close(cut.loss, full.loss.detach(), **TOL)
    torch.testing.assert_close(cut.kl[:k], full.kl[:k], **TOL)
    torch.testing.assert_close(cut.nll, full.nll, **TOL)
    torch.testing.assert_close(cut.entropy, full.entropy, **TOL)
    assert torch.equal(cut.is_top1, full.is_top1)
    for got, want in zip(_grads(h, w, b), _grads(h2, w2, b2)):
        torch.testing.assert_close(got, want, **TOL)

    h3, w3, b3 = _leaves(t)
    none = fused_constraint_kl(h3, w3, b3, t["g"][:0], t["gw"], t["gb"], kl_rows=0, targets=targets)
    torch.testing.assert_close(
        none.loss, F.cross_entropy(F.linear(t["h"], t["w"], t["b"]), targets, reduction="sum")
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (1.7, 4.0)])
def test_grad_stats_equal_the_logit_gradients(chunk_size, scale, softcap):
    """Per row |p - q*|^2, |p - e_t|^2 and their dot product, on KL rows with a target; 0 elsewhere."""
    t = _setup()
    k = 8
    targets = torch.randint(0, 37, (11,), generator=torch.Generator().manual_seed(9))
    targets[3] = -100
    weight = torch.full((11,), 0.2)
    weight[k:] = 0.0
    h, w, b = _leaves(t)
    out = fused_constraint_kl(
        h,
        w,
        b,
        t["g"][:k],
        t["gw"],
        t["gb"],
        row_weight=weight,
        targets=targets,
        kl_rows=k,
        chunk_size=chunk_size,
        logit_scale=scale,
        logit_softcap=softcap,
        grad_stats=True,
    )
    plain = _fused(
        t,
        *_leaves(t),
        row_weight=weight,
        targets=targets,
        chunk_size=chunk_size,
        logit_scale=scale,
        logit_softcap=softcap,
    )
    torch.testing.assert_close(out.loss, plain.loss, **TOL)  # asking for the statistics changes nothing
    logits, ref, z = _materialised(t, *_leaves(t), scale=scale, softcap=softcap)
    p = torch.softmax(logits.detach(), -1)[:k]
    q = guided_log_probs(ref[:k], z[:k]).exp()
    lm = p - F.one_hot(targets[:k].clamp(min=0), 37).float()
    expected = torch.stack([(p - q).square().sum(1), lm.square().sum(1), ((p - q) * lm).sum(1)], 1)
    expected[3] = 0.0
    assert out.grad_stats.shape == (11, 3) and (out.grad_stats[k:] == 0).all()
    torch.testing.assert_close(out.grad_stats[:k], expected, **TOL)
    with torch.no_grad():
        assert (_fused(t, *_leaves(t), targets=targets, grad_stats=True).grad_stats == 0).all()
    assert _fused(t, *_leaves(t), targets=targets).grad_stats is None


def test_nll_only_matches_cross_entropy_gradient():
    t = _setup()
    targets = torch.randint(0, 37, (11,), generator=torch.Generator().manual_seed(7))
    h, w, b = _leaves(t)
    out = _fused(t, h, w, b, targets=targets, row_weight=0.0, chunk_size=4)
    out.loss.backward()
    h2, w2, b2 = _leaves(t)
    nll = F.cross_entropy(F.linear(h2, w2, b2), targets, reduction="sum")
    nll.backward()
    torch.testing.assert_close(out.loss, nll.detach(), **TOL)
    for got, want in zip(_grads(h, w, b), _grads(h2, w2, b2)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (1.7, 4.0)])
def test_entropy_and_top1_equal_the_materialised_ones(grad, scale, softcap):
    """The SFT metrics (TRL's entropy and token accuracy) come out of the same pass, with and without grad."""
    t = _setup()
    logits0, _, _ = _materialised(t, *_leaves(t), scale=scale, softcap=softcap)
    targets = logits0.argmax(-1).clone()
    targets[[1, 4]] = (targets[[1, 4]] + 1) % 37  # two misses
    targets[[2, 7]] = -100
    h, w, b = _leaves(t)
    with torch.set_grad_enabled(grad):
        out = _fused(t, h, w, b, targets=targets, chunk_size=3, logit_scale=scale, logit_softcap=softcap)
    log_p = torch.log_softmax(logits0.detach(), -1)
    entropy = torch.where(targets != -100, -(log_p.exp() * log_p).sum(-1), 0.0)
    torch.testing.assert_close(out.entropy, entropy, **TOL)
    expected = (logits0.argmax(-1) == targets) & (targets != -100)
    assert out.is_top1.dtype == torch.bool and torch.equal(out.is_top1, expected)
    assert int(out.is_top1.sum()) == 7
    no_targets = _fused(t, *_leaves(t), chunk_size=3)
    assert no_targets.entropy is None and no_targets.is_top1 is None


# ------------------------------------------------------------------------------------------ which grads
class _Recorder(TorchDispatchMode):
    """Records the numel and shape of every new tensor an aten op returns (views and detach excluded)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, tuple[int, ...]]] = []

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for _, shape in self.sizes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket is torch.ops.aten.detach:
            return out
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.sizes.append((value.numel(), tuple(value.shape)))
        return out


def test_frozen_head_computes_no_weight_gradient():
    t = _setup(n=20, vocab=50, hidden=8)
    h, w, b = _leaves(t, weight_grad=False, bias_grad=False)
    with _Recorder() as rec:
        out = _fused(t, h, w, b, chunk_size=4)
        out.loss.backward()
    assert w.grad is None and b.grad is None
    assert (50, 8) not in rec.shapes  # no [V, H] weight-gradient buffer or product
    h2, w2, b2 = _leaves(t, weight_grad=False, bias_grad=False)
    logits, ref, z = _materialised(t, h2, w2, b2)
    constraint_kl_naive(logits[None], ref[None], z[None], None, reduction="sum").backward()
    torch.testing.assert_close(h.grad, h2.grad, **TOL)


def test_trainable_head_with_detached_hidden_states():
    t = _setup()
    w = t["w"].clone().requires_grad_(True)
    out = fused_constraint_kl(t["h"], w, None, t["g"], t["gw"], t["gb"], chunk_size=3)
    out.loss.backward()
    w2 = t["w"].clone().requires_grad_(True)
    logits = F.linear(t["h"], w2)
    z = F.linear(t["g"], t["gw"], t["gb"])
    constraint_kl_naive(logits[None], logits.detach()[None], z[None], None, reduction="sum").backward()
    torch.testing.assert_close(w.grad, w2.grad, **TOL)


def test_no_grad_mode_returns_values_only():
    t = _setup()
    h, w, b = _leaves(t)
    with torch.no_grad():
        out = _fused(t, h, w, b, chunk_size=4)
    assert not out.loss.requires_grad
    logits, ref, z = _materialised(t, h.detach(), w.detach(), b.detach())
    torch.testing.assert_close(out.kl, _per_row_kl(logits, ref, z), **TOL)


def test_backward_twice_raises():
    t = _setup()
    h, w, b = _leaves(t)
    out = _fused(t, h, w, b)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_bf16_inputs_accumulate_in_fp32():
    t = _setup(n=16, vocab=64, hidden=16)
    h = t["h"].bfloat16().requires_grad_(True)
    w = t["w"].bfloat16().requires_grad_(True)
    out = fused_constraint_kl(h, w, None, t["g"], t["gw"], t["gb"], chunk_size=5, logit_softcap=5.0)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.kl.dtype == torch.float32
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16

    h2 = t["h"].bfloat16().float().requires_grad_(True)  # the same values, in fp32
    w2 = t["w"].bfloat16().float().requires_grad_(True)
    logits = _transform(F.linear(h2, w2), 1.0, 5.0)
    z = F.linear(t["g"], t["gw"], t["gb"])
    expected = constraint_kl_naive(logits[None], logits.detach()[None], z[None], None, reduction="sum")
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach(), atol=1e-4, rtol=1e-5)  # fp32 accumulation
    torch.testing.assert_close(h.grad.float(), h2.grad, atol=2e-2, rtol=2e-2)  # bf16 gradient rounding
    torch.testing.assert_close(w.grad.float(), w2.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (bf16 weights use mm with out_dtype=fp32)"
)
def test_cuda_bf16_head_matches_fp32_reference():
    t = {k: None if v is None else v.cuda() for k, v in _setup(n=40, vocab=300, hidden=32).items()}
    h = t["h"].bfloat16().requires_grad_(True)
    w = t["w"].bfloat16().requires_grad_(True)
    out = fused_constraint_kl(
        h, w, None, t["g"], t["gw"], t["gb"], chunk_size=7, targets=torch.arange(40).cuda()
    )
    out.loss.backward()
    h2 = t["h"].bfloat16().float().requires_grad_(True)
    w2 = t["w"].bfloat16().float().requires_grad_(True)
    logits = F.linear(h2, w2)
    z = F.linear(t["g"], t["gw"], t["gb"])
    kl = constraint_kl_naive(logits[None], logits.detach()[None], z[None], None, reduction="sum")
    expected = kl + F.cross_entropy(logits, torch.arange(40).cuda(), reduction="sum")
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach(), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(h.grad.float(), h2.grad, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(w.grad.float(), w2.grad, atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("reference", ["policy", "base"])
@pytest.mark.parametrize("head_trains", [False, True])
def test_working_set_never_holds_rows_by_vocab(reference, head_trains):
    """No op inside forward or backward produces a tensor larger than ``[chunk, V]`` (or the ``[V, H]`` grad)."""
    n, hidden, vocab, chunk = 64, 8, 256, 4
    t = _setup(n=n, hidden=hidden, vocab=vocab, g_hidden=8)
    h, w, b = _leaves(t, weight_grad=head_trains, bias_grad=head_trains)
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
    with _Recorder() as rec:
        out = _fused(t, h, w, b, reference=reference, targets=targets, chunk_size=chunk, logit_softcap=3.0)
        out.loss.backward()
    big = [(numel, shape) for numel, shape in rec.sizes if numel > chunk * vocab]
    assert all(shape == (vocab, hidden) for _, shape in big), big  # only the weight gradient, if any
    assert bool(big) == head_trains

    with _Recorder() as rec:  # the recorder does see [N, V] tensors where they exist
        logits, ref, z = _materialised(t, *_leaves(t))
        constraint_kl(logits[None], ref[None], z[None], None, chunk_size=chunk, reduction="sum").backward()
    assert max(numel for numel, _ in rec.sizes) >= n * vocab


def _peak_live_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU allocator while ``fn`` runs (profiler timeline)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None or not hasattr(results, "events"):
        pytest.skip("this torch build's profiler exposes no memory timeline")
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    if not events:
        pytest.skip("the profiler recorded no CPU memory events")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("reference", ["policy", "base"])
@pytest.mark.parametrize("head_trains", [False, True])
def test_peak_live_memory_is_a_few_chunks(reference, head_trains):
    """Forward + backward hold about three [chunk, V] fp32 tensors at a time, far below one [N, V] tensor."""
    n, hidden, vocab, chunk = 64, 8, 4096, 4
    t = _setup(n=n, hidden=hidden, vocab=vocab, g_hidden=8)
    h, w, b = _leaves(t, weight_grad=head_trains, bias_grad=head_trains)
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))

    def fused():
        out = _fused(t, h, w, b, reference=reference, targets=targets, chunk_size=chunk, logit_softcap=3.0)
        out.loss.backward()

    def materialised():
        logits, ref, z = _materialised(t, *_leaves(t), reference=reference)
        constraint_kl(logits[None], ref[None], z[None], None, chunk_size=chunk, reduction="sum").backward()

    row_block = chunk * vocab * 4
    weight_grad = (
        2 * (vocab * hidden + vocab) * 4 if head_trains else 0
    )  # the fp32 buffer + one matmul output
    peak = _peak_live_bytes(fused)
    assert peak <= 3.5 * row_block + weight_grad + 4 * n * hidden * 4, peak / row_block
    assert peak - weight_grad < 0.25 * n * vocab * 4
    assert _peak_live_bytes(materialised) >= n * vocab * 4  # the measurement sees [N, V] tensors


def test_default_chunk_size():
    assert fused_chunk_size(1) == 16
    assert fused_chunk_size(1024) == 64
    assert fused_chunk_size(1000) == 64
    assert fused_chunk_size(1100) == 72
    assert fused_chunk_size(4096) == 256
    assert fused_chunk_size(10**6) == 256
    assert fused_chunk_size(100, max_chunk=8) == 8
    # small problems run in one chunk (one [N, V] fp32 tensor <= 64 MiB), large ones in N/16-row chunks
    assert fused_chunk_size(256, vocab=49152) == 256  # 48 MiB: 4 x 64 tokens of SmolLM2
    assert fused_chunk_size(300, vocab=49152) == 256  # one chunk, capped at max_chunk
    assert fused_chunk_size(1024, vocab=49152) == 64  # 192 MiB: T = 1024, working set ~0.19 x [N, V]
    assert fused_chunk_size(11, vocab=37) == 11


# ------------------------------------------------------------------------------------------ API
def test_module_wrapper_matches_function():
    t = _setup()
    head = torch.nn.Linear(8, 37)
    guidance_head = torch.nn.Linear(6, 37)
    module = FusedConstraintKL(logit_scale=0.5, logit_softcap=3.0, chunk_size=4)
    out = module(t["h"], head, t["g"], guidance_head)
    expected = fused_constraint_kl(
        t["h"],
        head.weight,
        head.bias,
        t["g"],
        guidance_head.weight,
        guidance_head.bias,
        logit_scale=0.5,
        logit_softcap=3.0,
        chunk_size=4,
    )
    torch.testing.assert_close(out.loss, expected.loss)
    assert "softcap=3.0" in repr(module)


def test_module_wrapper_uses_a_guidance_heads_context_terms():
    """A GuidanceHead with a shared logit and a token term: the module computes z with both (not weight and bias
    alone), the same as passing z from the head as a callable."""
    from steer.guidance.head import GuidanceHead

    t = _setup()
    head = torch.nn.Linear(8, 37)
    guidance_head = GuidanceHead(6, 37, shared=True, token_rank=2)
    guidance_head.set_token_basis(torch.randn(37, 6))
    with torch.no_grad():
        guidance_head.shared.normal_()
        guidance_head.token_up.normal_()
    module = FusedConstraintKL(chunk_size=4)
    out = module(t["h"], head, t["g"], guidance_head)
    expected = fused_constraint_kl(
        t["h"], head.weight, head.bias, lambda start, end: guidance_head(t["g"][start:end]), chunk_size=4
    )
    torch.testing.assert_close(out.loss, expected.loss)
    plain = fused_constraint_kl(
        t["h"], head.weight, head.bias, t["g"], guidance_head.weight, guidance_head.bias, chunk_size=4
    )
    assert not torch.allclose(out.loss, plain.loss)


def test_empty_rows_give_zero():
    t = _setup()
    h = t["h"][:0].clone().requires_grad_(True)
    out = fused_constraint_kl(h, t["w"], t["b"], t["g"][:0], t["gw"], t["gb"])
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and h.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reduction": "none"}, "reduction"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"reference": "base"}, "reference"),
        ({"reference": torch.zeros(3, 8)}, "reference hidden"),
        ({"row_weight": torch.ones(5)}, "row_weight"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, "targets"),
        ({"targets": torch.full((11,), 37)}, "targets must be in"),
        ({"nll_weight": 1.0}, "nll_weight needs targets"),
        ({"logit_softcap": -1.0}, "logit_softcap"),
        ({"kl_rows": 12}, "kl_rows"),
        ({"kl_rows": -1}, "kl_rows"),
    ],
)
def test_invalid_arguments_are_named(kwargs, match):
    t = _setup()
    with pytest.raises(ValueError, match=match):
        fused_constraint_kl(t["h"], t["w"], t["b"], t["g"], t["gw"], t["gb"], **kwargs)


def test_invalid_shapes_are_named():
    t = _setup()
    with pytest.raises(ValueError, match="policy_hidden"):
        fused_constraint_kl(t["h"][None], t["w"], None, t["g"], t["gw"])
    with pytest.raises(ValueError, match="head_weight"):
        fused_constraint_kl(t["h"], t["w"].t(), None, t["g"], t["gw"])
    with pytest.raises(ValueError, match="guidance_weight"):
        fused_constraint_kl(t["h"], t["w"], None, t["g"], t["gw"].t())
    with pytest.raises(ValueError, match="guidance_weight and guidance_bias must be None"):
        fused_constraint_kl(t["h"], t["w"], None, lambda s, e: t["g"][s:e], t["gw"])
    with pytest.raises(ValueError, match="z for rows"):
        fused_constraint_kl(t["h"], t["w"], None, lambda s, e: torch.zeros(e - s, 5))
    with pytest.raises(ValueError, match="guidance_hidden must be"):
        fused_constraint_kl(t["h"], t["w"], None, None)
    with pytest.raises(ValueError, match=r"guidance_hidden must be \[4, Hg\]"):
        fused_constraint_kl(t["h"], t["w"], None, t["g"], t["gw"], kl_rows=4)
    with pytest.raises(ValueError, match=r"reference hidden states must be \[4, 8\]"):
        fused_constraint_kl(t["h"], t["w"], None, t["g"][:4], t["gw"], kl_rows=4, reference=t["ref_h"])
    with pytest.raises(ValueError, match="row_weight must be 0 on the rows from kl_rows=4"):
        fused_constraint_kl(t["h"], t["w"], None, t["g"][:4], t["gw"], kl_rows=4, row_weight=1.0)


# ------------------------------------------------------------------------------------------ real models
def test_tiny_peft_policy_with_guidance_adapter_matches_trainer_path(tiny_llama):
    """Policy hidden states + lm_head and the GuidanceModel's hidden states + head, as the trainer uses them."""
    from peft import LoraConfig, get_peft_model

    from steer.guidance import GuidanceConfig, GuidanceModel

    model, _ = tiny_llama
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    guidance.set_trainable(False)
    with torch.no_grad():
        guidance.head.weight.normal_(0, 0.1)
        guidance.head.bias.normal_(0, 1.0)
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, 5:] = 0
    mask = attention.bool()
    mask[:, -1] = False
    body = policy.get_base_model().model
    lm_head = policy.get_output_embeddings()

    hidden = body(input_ids=ids, attention_mask=attention).last_hidden_state
    with torch.no_grad():
        g_hidden = guidance.hidden_states(ids, attention)[mask]
        z = guidance(ids, attention)
    out = fused_constraint_kl(
        hidden[mask],
        lm_head.weight,
        lm_head.bias,
        g_hidden,
        guidance.head.weight,
        guidance.head.bias,
        chunk_size=3,
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert grads and lm_head.weight.grad is None  # LoRA: the head is frozen
    policy.zero_grad(set_to_none=True)

    logits = policy(input_ids=ids, attention_mask=attention).logits
    expected = constraint_kl(logits, logits.detach(), z, mask, reduction="sum")
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach(), **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(policy.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


def test_the_scratch_buffers_change_no_value(monkeypatch):
    """CPU chunks share three scratch buffers; the allocating path (accelerators) gives the same loss and grads."""
    import steer.guidance.fused_kl as fused_kl

    torch.manual_seed(0)
    n, hidden, vocab = 13, 8, 37
    h = torch.randn(n, hidden, requires_grad=True)
    weight, g, g_weight, g_bias = (
        torch.randn(vocab, hidden),
        torch.randn(n, 6),
        torch.randn(vocab, 6),
        torch.randn(vocab),
    )
    ref, targets = torch.randn(n, hidden), torch.randint(0, vocab, (n,))

    def run():
        out = fused_constraint_kl(
            h, weight, None, g, g_weight, g_bias, reference=ref, targets=targets, nll_weight=0.5, chunk_size=4
        )
        out.loss.backward()
        grad, h.grad = h.grad.clone(), None
        return out, grad

    shared, shared_grad = run()
    monkeypatch.setattr(fused_kl, "_SCRATCH_DEVICES", ())
    fresh, fresh_grad = run()
    assert torch.equal(shared.loss, fresh.loss) and torch.equal(shared.kl, fresh.kl)
    assert torch.equal(shared.nll, fresh.nll) and torch.equal(shared_grad, fresh_grad)
