"""q* and the chunked closed-form constraint KL against full-tensor references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from steer.guidance import constraint_kl, constraint_kl_naive, guided_log_probs


def _inputs(batch=3, length=11, vocab=37, scale=3.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    policy = (torch.randn(batch, length, vocab, generator=gen) * scale).to(dtype)
    ref = torch.randn(batch, length, vocab, generator=gen) * scale
    z = torch.randn(batch, length, vocab, generator=gen) * 4
    return policy, ref, z


def _padded_mask(batch=3, length=11):
    """Left-padded prompts, continuations of different lengths, right padding after EOS."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, 3:9] = True
    mask[1, 5:11] = True
    mask[2, 2:4] = True
    return mask


def _kl_and_grad(fn, policy, ref, z, mask, **kwargs):
    leaf = policy.detach().clone().requires_grad_(True)
    loss = fn(leaf, ref, z, mask, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def test_guided_log_probs_is_normalised_product():
    _, ref, z = _inputs()
    log_q = guided_log_probs(ref, z)
    assert log_q.dtype == torch.float32
    expected = torch.softmax(ref, -1) * torch.sigmoid(z)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(log_q.exp(), expected, atol=1e-6, rtol=1e-5)


def test_zero_guidance_head_gives_q_equal_p():
    _, ref, _ = _inputs()
    log_q = guided_log_probs(ref, torch.zeros_like(ref))
    torch.testing.assert_close(log_q, torch.log_softmax(ref, -1), atol=1e-6, rtol=1e-6)
    policy = ref.clone().requires_grad_(True)
    kl = constraint_kl(policy, ref, torch.zeros_like(ref), None)
    assert abs(float(kl)) < 1e-5


def test_bf16_inputs_are_computed_in_fp32():
    _, ref, z = _inputs()
    log_q = guided_log_probs(ref.bfloat16(), z.bfloat16())
    assert log_q.dtype == torch.float32
    torch.testing.assert_close(log_q, guided_log_probs(ref.bfloat16().float(), z.bfloat16().float()))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 7, 256])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_matches_naive_on_padded_batch(chunk_size, reduction):
    policy, ref, z = _inputs()
    mask = _padded_mask()
    kl, grad = _kl_and_grad(constraint_kl, policy, ref, z, mask, chunk_size=chunk_size, reduction=reduction)
    kl_ref, grad_ref = _kl_and_grad(constraint_kl_naive, policy, ref, z, mask, reduction=reduction)
    torch.testing.assert_close(kl, kl_ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, grad_ref, atol=1e-7, rtol=1e-5)
    assert (grad[~mask] == 0).all()  # padding and prompt positions get no gradient


@pytest.mark.parametrize("chunk_size", [1, 4, 256])
def test_chunked_matches_naive_on_fragmented_mask(chunk_size):
    policy, ref, z = _inputs(batch=4, length=64)
    mask = torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) > 0.5  # gather path
    kl, grad = _kl_and_grad(constraint_kl, policy, ref, z, mask, chunk_size=chunk_size)
    kl_ref, grad_ref = _kl_and_grad(constraint_kl_naive, policy, ref, z, mask)
    torch.testing.assert_close(kl, kl_ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, grad_ref, atol=1e-7, rtol=1e-5)


def test_non_contiguous_shifted_logits_and_runs_across_rows():
    policy, ref, z = _inputs(batch=3, length=12)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 6:] = True  # runs up to the end of row 0 ...
    mask[1, :4] = True  # ... and from the start of row 1: two runs, not one
    mask[2, 3:9] = True
    leaf = policy.clone().requires_grad_(True)
    shifted = leaf[:, :-1]  # what a trainer passes: logits at t predict token t+1
    assert not shifted.is_contiguous()
    kl = constraint_kl(shifted, ref[:, :-1], z[:, :-1], mask, chunk_size=3)
    kl.backward()
    leaf_ref = policy.clone().requires_grad_(True)
    constraint_kl_naive(leaf_ref[:, :-1], ref[:, :-1], z[:, :-1], mask).backward()
    expected = constraint_kl_naive(policy[:, :-1], ref[:, :-1], z[:, :-1], mask)
    torch.testing.assert_close(kl.detach(), expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(leaf.grad, leaf_ref.grad, atol=1e-7, rtol=1e-5)


def test_matches_explicit_formula_per_position():
    policy, ref, z = _inputs(batch=2, length=3, vocab=5)
    q = torch.softmax(ref, -1) * torch.sigmoid(z)
    q = q / q.sum(-1, keepdim=True)
    p = torch.softmax(policy, -1)
    expected = (q * (q.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(constraint_kl(policy, ref, z, None), expected, atol=1e-6, rtol=1e-5)


def test_gradient_is_softmax_minus_q():
    policy, ref, z = _inputs()
    mask = _padded_mask()
    _, grad = _kl_and_grad(constraint_kl, policy, ref, z, mask, reduction="sum")
    expected = (torch.softmax(policy, -1) - guided_log_probs(ref, z).exp()) * mask[..., None]
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=1e-5)


def test_no_gradient_reaches_reference_or_guidance():
    policy, ref, z = _inputs()
    ref = ref.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True)
    policy = policy.clone().requires_grad_(True)
    for fn in (constraint_kl, constraint_kl_naive):
        fn(policy, ref, z, _padded_mask()).backward()
        assert ref.grad is None and z.grad is None
        assert policy.grad is not None and policy.grad.abs().sum() > 0
        policy.grad = None


def test_gradient_flows_through_a_graph_and_scales_with_upstream():
    policy, ref, z = _inputs()
    weight = torch.tensor(2.0, requires_grad=True)
    (3.0 * constraint_kl(policy * weight, ref, z, _padded_mask())).backward()
    w2 = torch.tensor(2.0, requires_grad=True)
    (3.0 * constraint_kl_naive(policy * w2, ref, z, _padded_mask())).backward()
    torch.testing.assert_close(weight.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_bf16_policy_gradients_match():
    policy, ref, z = _inputs(dtype=torch.bfloat16)
    mask = _padded_mask()
    kl, grad = _kl_and_grad(constraint_kl, policy, ref, z, mask)
    kl_ref, grad_ref = _kl_and_grad(constraint_kl_naive, policy, ref, z, mask)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(kl, kl_ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("value", [1e4, -1e4])
def test_extreme_logits_stay_finite(value):
    policy, ref, z = _inputs(batch=2, length=5, vocab=11)
    policy[0, 0, :] = value
    policy[0, 1, 3] = value
    ref[0, 0, 2] = value
    ref[1, 2, :] = -value
    z[:, :, ::2] = value
    z[1, :, 1::2] = -value
    for fn in (constraint_kl, constraint_kl_naive):
        kl, grad = _kl_and_grad(fn, policy, ref, z, None)
        assert torch.isfinite(kl) and torch.isfinite(grad).all()
    torch.testing.assert_close(
        _kl_and_grad(constraint_kl, policy, ref, z, None)[0],
        _kl_and_grad(constraint_kl_naive, policy, ref, z, None)[0],
    )
    assert torch.isfinite(guided_log_probs(ref, z)).all()


def test_minus_inf_reference_logits_count_as_zero_probability():
    policy, ref, z = _inputs(batch=1, length=2, vocab=6)
    ref[..., :3] = float("-inf")  # e.g. a top-k filtered reference
    kl, grad = _kl_and_grad(constraint_kl, policy, ref, z, None)
    q = guided_log_probs(ref, z).exp()
    expected = torch.where(q > 0, q * (q.log() - torch.log_softmax(policy, -1)), 0.0).sum(-1).mean()
    assert torch.isfinite(kl) and torch.isfinite(grad).all()
    torch.testing.assert_close(kl, expected, atol=1e-6, rtol=1e-5)


def test_empty_mask_gives_zero_and_zero_gradient():
    policy, ref, z = _inputs()
    mask = torch.zeros(policy.shape[:2], dtype=torch.bool)
    for fn in (constraint_kl, constraint_kl_naive):
        kl, grad = _kl_and_grad(fn, policy, ref, z, mask)
        assert float(kl) == 0.0 and (grad == 0).all()


def test_no_grad_mode_and_values_match_kl_div():
    policy, ref, z = _inputs()
    with torch.no_grad():
        kl = constraint_kl(policy, ref, z, _padded_mask(), reduction="sum")
    log_q = guided_log_probs(ref, z)
    per_pos = F.kl_div(torch.log_softmax(policy, -1), log_q, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, per_pos[_padded_mask()].sum(), atol=1e-5, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    policy, ref, z = _inputs()
    with pytest.raises(ValueError, match="ref_logits"):
        constraint_kl(policy, ref[:, :-1], z, None)
    with pytest.raises(ValueError, match="mask"):
        constraint_kl(policy, ref, z, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        constraint_kl(policy, ref, z, None, reduction="max")
    with pytest.raises(ValueError, match="chunk_size"):
        constraint_kl(policy, ref, z, None, chunk_size=0)


def test_second_backward_through_same_graph_is_refused():
    policy, ref, z = _inputs()
    leaf = policy.clone().requires_grad_(True)
    loss = constraint_kl(leaf, ref, z, None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
