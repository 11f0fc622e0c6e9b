"""guidance_loss: BCE at sampled continuation tokens, masks, weights, consistency regulariser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from steer.guidance import guidance_loss, importance_weights, suffix_importance_weights


def _batch(vocab=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 8), generator=gen)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 3:8] = True  # prompt 0..2, continuation to the end
    mask[1, 4:6] = True  # continuation stops at EOS (position 5), then padding
    mask[2, 2:7] = True
    z = torch.randn(3, 8, vocab, generator=gen) * 2
    labels = torch.tensor([1.0, 0.0, 1.0])
    return z, input_ids, mask, labels


def _manual_bce(z, input_ids, mask, labels, weights=None):
    total, denom = 0.0, 0.0
    for b in range(z.shape[0]):
        w = 1.0 if weights is None else float(weights[b])
        for t in range(1, z.shape[1]):
            if mask[b, t]:
                logit = z[b, t - 1, input_ids[b, t]]
                total += w * float(F.binary_cross_entropy_with_logits(logit, labels[b]))
                denom += w
    return total / denom


def test_bce_matches_manual_token_loop():
    z, ids, mask, labels = _batch()
    loss, metrics = guidance_loss(z, ids, mask, labels)
    assert loss.item() == pytest.approx(_manual_bce(z, ids, mask, labels), rel=1e-5)
    assert metrics["tokens"] == float(mask[:, 1:].sum())
    assert metrics["bce"] == pytest.approx(loss.item())


def test_bce_is_on_logits_not_logsigmoid():
    z, ids, mask, labels = _batch()
    confident = torch.where(labels[:, None, None] > 0.5, 30.0, -30.0).expand_as(z).clone()
    loss, metrics = guidance_loss(confident, ids, mask, labels)
    assert loss.item() < 1e-6  # BCE on logsigmoid(z) would be ~log 2 or worse for the negative sample
    assert metrics["accuracy"] == 1.0


def test_masked_positions_do_not_matter_and_get_no_gradient():
    z, ids, mask, labels = _batch()
    z = z.clone().requires_grad_(True)
    loss, _ = guidance_loss(z, ids, mask, labels)
    loss.backward()
    scored = torch.zeros_like(z, dtype=torch.bool)
    for b in range(3):
        for t in range(1, 8):
            if mask[b, t]:
                scored[b, t - 1, ids[b, t]] = True
    assert (z.grad[~scored] == 0).all() and (z.grad[scored] != 0).all()
    changed = z.detach().clone()
    changed[~scored] = 123.0
    torch.testing.assert_close(guidance_loss(changed, ids, mask, labels)[0], loss.detach())


def test_soft_labels_and_metrics():
    z, ids, mask, _ = _batch()
    soft = torch.tensor([0.9, 0.2, 0.6])
    loss, metrics = guidance_loss(z, ids, mask, soft)
    assert loss.item() == pytest.approx(_manual_bce(z, ids, mask, soft), rel=1e-5)
    assert metrics["label_mean"] == pytest.approx(float(soft.mean()))
    assert 0.0 <= metrics["r_mean"] <= 1.0


def test_weights_are_self_normalised_and_zero_weight_drops_a_sample():
    z, ids, mask, labels = _batch()
    w = torch.tensor([0.5, 2.0, 1.0])
    loss, _ = guidance_loss(z, ids, mask, labels, weights=w)
    assert loss.item() == pytest.approx(_manual_bce(z, ids, mask, labels, w), rel=1e-5)
    torch.testing.assert_close(guidance_loss(z, ids, mask, labels, weights=10 * w)[0], loss)
    dropped, _ = guidance_loss(z, ids, mask, labels, weights=torch.tensor([1.0, 0.0, 1.0]))
    keep = [0, 2]
    expected, _ = guidance_loss(z[keep], ids[keep], mask[keep], labels[keep])
    torch.testing.assert_close(dropped, expected)


def test_consistency_is_zero_for_uniform_guidance_and_positive_otherwise():
    z, ids, mask, labels = _batch()
    ref = torch.randn_like(z)
    zero = torch.zeros_like(z)
    _, metrics = guidance_loss(zero, ids, mask, labels, consistency_coef=1.0, ref_logits=ref)
    assert metrics["consistency"] == pytest.approx(0.0, abs=1e-7)
    z = z.clone().requires_grad_(True)
    loss, metrics = guidance_loss(z, ids, mask, labels, consistency_coef=0.5, ref_logits=ref)
    assert metrics["consistency"] > 0
    assert loss.item() == pytest.approx(metrics["bce"] + 0.5 * metrics["consistency"], rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_consistency_matches_explicit_bernoulli_kl():
    z, ids, mask, labels = _batch(vocab=5)
    ref = torch.randn_like(z)
    _, metrics = guidance_loss(z, ids, mask, labels, consistency_coef=1.0, ref_logits=ref)
    kls = []
    for b in range(3):
        for t in range(1, 7):
            if mask[b, t] and mask[b, t + 1]:
                r = torch.sigmoid(z[b, t - 1, ids[b, t]])
                e = (torch.softmax(ref[b, t], -1) * torch.sigmoid(z[b, t])).sum()
                kls.append(r * (r / e).log() + (1 - r) * ((1 - r) / (1 - e)).log())
    assert metrics["consistency"] == pytest.approx(float(torch.stack(kls).mean()), rel=1e-4)


def test_stable_with_extreme_logits():
    z, ids, mask, labels = _batch()
    z = (torch.sign(z) * 1e4).requires_grad_(True)
    ref = torch.randn_like(z) * 1e4
    loss, _ = guidance_loss(z, ids, mask, labels, consistency_coef=1.0, ref_logits=ref)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_bad_inputs_raise():
    z, ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="ref_logits"):
        guidance_loss(z, ids, mask, labels, consistency_coef=0.1)
    with pytest.raises(ValueError, match="labels"):
        guidance_loss(z, ids, mask, torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="continuation_mask"):
        guidance_loss(z, ids, mask[:, :-1], labels)
    with pytest.raises(ValueError, match="weights"):
        guidance_loss(z, ids, mask, labels, weights=torch.tensor([1.0, -1.0, 1.0]))


def test_importance_weights():
    equal = importance_weights(torch.zeros(4), torch.zeros(4))
    torch.testing.assert_close(equal, torch.ones(4))
    w = importance_weights(torch.tensor([0.0, 0.0, -1000.0]), torch.tensor([-1.0, 0.0, 0.0]))
    assert torch.isfinite(w).all() and w.mean().item() == pytest.approx(1.0)
    assert w[0] > w[1] > w[2]
    clipped = importance_weights(torch.tensor([50.0, 0.0, 0.0]), torch.zeros(3), max_weight=1.5)
    assert clipped.max().item() <= 1.5 + 1e-6  # truncated, never re-inflated above the cap


def test_suffix_importance_weights_reweight_only_the_tokens_after():
    target = torch.tensor([[0.0, -1.0, -2.0, -1.0], [-1.0, -1.0, 0.0, 0.0]])
    sampling = torch.tensor([[-1.0, -1.0, -1.0, -2.0], [-1.0, -3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    w = suffix_importance_weights(target, sampling, mask, max_weight=100.0)
    delta = (target - sampling) * mask
    for b in range(2):
        for t in range(4):
            expected = float(torch.exp(delta[b, t + 1 :].sum()))
            assert w[b, t].item() == pytest.approx(expected, rel=1e-5)
    assert w[0, 3].item() == 1.0 and w[1, 1].item() == 1.0  # the last token of a continuation: exact label
    capped = suffix_importance_weights(target, sampling, mask, max_weight=1.5)
    assert capped.max().item() <= 1.5 + 1e-6
    # as per-token loss weights: each token's BCE weighted on its own
    z, ids, cont, labels = _batch()
    per_token = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) + 0.1
    loss, _ = guidance_loss(z, ids, cont, labels, weights=per_token)
    m = cont[:, 1:]
    bce = F.binary_cross_entropy_with_logits(
        z[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1),
        labels[:, None].expand(3, 7),
        reduction="none",
    )
    assert loss.item() == pytest.approx(float((bce * per_token * m).sum() / (per_token * m).sum()), rel=1e-5)


def test_suffix_weights_estimate_the_base_conditional_from_policy_samples():
    """Two tokens, C = "token 1 appears". From x1 = 0 the base writes token 1 with probability 0.5, the policy with
    0.9: weighted by the ratio of the token after it, the label mean at x1 = 0 is P_base(C | x1 = 0) = 0.5."""
    gen = torch.Generator().manual_seed(0)
    n = 20000
    x2 = (torch.rand(n, generator=gen) < 0.9).long()  # policy samples after x1 = 0
    log_base = torch.log(torch.full((n,), 0.5))
    log_policy = torch.log(torch.where(x2 == 1, torch.tensor(0.9), torch.tensor(0.1)))
    target = torch.stack([torch.zeros(n), log_base], 1)  # x1's own ratio does not enter its weight
    sampling = torch.stack([torch.zeros(n), log_policy], 1)
    w = suffix_importance_weights(target, sampling, torch.ones(n, 2, dtype=torch.bool), max_weight=10.0)
    y = x2.float()
    assert float((w[:, 0] * y).sum() / w[:, 0].sum()) == pytest.approx(0.5, abs=0.02)
    assert float(y.mean()) == pytest.approx(0.9, abs=0.02)  # unweighted: the policy's conditional
