"""ConstraintKL on its own (no trainer): z from GuidanceModel.logits, positions, fused == chunked."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from steer.guidance import ConstraintKL, GuidanceConfig, GuidanceModel, KLSettings, constraint_kl_naive
from steer.guidance.constraint_kl import counted_window
from steer.guidance.context_prior import ContextPrior
from steer.models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _models(seed: int = 0):
    policy, tokenizer = tiny_causal_lm("llama", seed=seed)
    policy = get_peft_model(policy, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from R = 0.5
        guidance.head.weight.copy_(torch.randn(guidance.head.weight.shape, generator=gen) * 0.3)
        guidance.head.bias.copy_(torch.randn(guidance.head.bias.shape, generator=gen))
    guidance.set_trainable(False)
    return policy, guidance


def _batch(vocab: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 9), generator=gen)
    attention = torch.ones_like(ids)
    attention[2, 6:] = 0  # right padding
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt
    labels[attention == 0] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def test_logits_is_the_forward_z_with_the_context_offsets():
    policy, guidance = _models()
    batch = _batch(guidance.vocab_size)
    ids = batch["input_ids"]
    guidance.set_context_prior(
        ContextPrior(torch.tensor([[-1, -1, int(ids[0, 3])]]), torch.tensor([5]), torch.tensor([-3.0]))
    )
    with torch.no_grad():
        z = guidance(ids, batch["attention_mask"])
        hidden = guidance.hidden_states(ids, batch["attention_mask"])
        plain = guidance.logits(hidden)
        with_prior = guidance.logits(hidden, guidance.contexts(ids, batch["attention_mask"]))
    torch.testing.assert_close(with_prior, z)
    assert float(plain[0, 3, 5] - z[0, 3, 5]) == pytest.approx(3.0)  # the offset where the context matches
    assert torch.equal(plain[0, 2], z[0, 2])  # and nowhere else


def test_counted_window_cuts_rows_and_columns_without_positions():
    inputs = {"input_ids": torch.arange(12).view(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 2] = True
    ids, attention, cut = counted_window(inputs, mask)
    assert ids.tolist() == [[0, 1, 2], [8, 9, 10]] and attention.shape == (2, 3)
    assert cut.tolist() == [[False, True, False], [False, False, True]]
    none = torch.zeros(3, 4, dtype=torch.bool)
    assert counted_window(inputs, none)[0] is inputs["input_ids"]


@pytest.mark.parametrize("reference", ["policy", "base"])
def test_fused_and_chunked_terms_equal_the_naive_kl(reference):
    policy, guidance = _models()
    batch = _batch(guidance.vocab_size)
    results = {}
    for implementation in ("chunked", "fused"):
        settings = KLSettings(
            coef=0.7, reference=reference, implementation=implementation, positions="corpus"
        )
        kl = ConstraintKL(guidance, lambda: policy, settings)
        supervised, targets = kl.corpus_mask(batch)
        with kl.capture() as captured:
            policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = captured[0]
        out = kl(batch, hidden, supervised=supervised, targets=targets, n_corpus=3, denom=supervised.sum())
        assert (kl.fused_head() is not None) == (implementation == "fused")
        results[implementation] = (float(out.loss), float(out.terms["corpus"]))
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = logits
        if reference == "base":
            with policy.disable_adapter():
                ref = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z = guidance(batch["input_ids"], batch["attention_mask"])
        naive = constraint_kl_naive(logits, ref, z, supervised, reduction="sum")
    assert float(naive) > 1e-3
    for loss, term in results.values():
        assert term == pytest.approx(float(naive), rel=1e-4)
        assert loss == pytest.approx(0.7 * float(naive) / float(supervised.sum()), rel=1e-4)


def test_settled_positions_start_after_the_first_counted_position():
    from steer.guidance.constraint_kl import settled_positions

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 7, 6, 6, 6, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    seen = []

    def has_seven(prefixes):
        seen.extend(prefixes)
        return [7 in p for p in prefixes]

    settled = settled_positions(ids, mask, has_seven)
    # row 0: continuation from token 2 on; position 2 has read [7] -> settled, and so on
    # row 1: continuation from token 1 on ([7, ...]); position 1 has read [7]
    assert settled.tolist() == [
        [False, False, True, True, True, False],
        [False, True, True, True, False, False],
    ]
    assert [7] in seen and [] not in seen  # the first counted position has read nothing: not asked


@pytest.mark.parametrize("implementation", ["chunked", "fused"])
def test_settled_positions_get_the_reference_as_target(implementation):
    """With stop_when_satisfied, R = 1 after a settling prefix: the KL there is KL(p_ref || p_theta), which is 0 with
    the policy as reference, and the other positions keep the full term."""
    policy, guidance = _models()
    batch = _batch(guidance.vocab_size)
    settle_at = int(batch["input_ids"][0, 4])  # row 0 is settled once it has read its token 4
    settings = KLSettings(
        coef=1.0, implementation=implementation, positions="corpus", stop_when_satisfied=True
    )
    with pytest.raises(ValueError, match="needs prefix_settled"):
        ConstraintKL(guidance, lambda: policy, settings)
    kl = ConstraintKL(
        guidance, lambda: policy, settings, prefix_settled=lambda ps: [settle_at in p for p in ps]
    )
    plain = ConstraintKL(
        guidance, lambda: policy, KLSettings(coef=1.0, implementation=implementation, positions="corpus")
    )
    supervised, targets = kl.corpus_mask(batch)
    with kl.capture() as captured:
        policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = captured[0]
    out = kl(batch, hidden, supervised=supervised, targets=targets, n_corpus=3, denom=supervised.sum())
    with plain.capture() as captured:
        policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    full = plain(
        batch, captured[0], supervised=supervised, targets=targets, n_corpus=3, denom=supervised.sum()
    )
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z = guidance(batch["input_ids"], batch["attention_mask"])
        keep = supervised.clone()
        keep[0, 4:] = False  # row 0's positions 4.. have read token 4
        naive = constraint_kl_naive(logits, logits, z, keep, reduction="sum")
    assert 0 < out.metrics["kl_settled_share"] < 1
    assert float(out.terms["corpus"]) == pytest.approx(float(naive), rel=1e-4, abs=1e-6)
    assert float(out.terms["corpus"]) < float(full.terms["corpus"])


def test_violated_positions_drop_everything_after_the_first_violating_prefix():
    from steer.guidance.constraint_kl import violated_positions

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 7, 6, 6, 6, 0], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    seen = []

    def probs(rows):  # a prefix violates once it holds a 7; a later 8 would "dilute" it back
        seen.extend(rows)
        return [
            torch.tensor(
                [0.1 if 7 in row[: j + 1] and 8 not in row[: j + 1] else 0.9 for j in range(len(row))]
            )
            for row in rows
        ]

    violated = violated_positions(ids, mask, probs, 0.5)
    # row 0: continuation [7, 8, 9] from token 2; position 2 has read [7]: dropped, and so stays although
    # the oracle scores [7, 8] satisfied again
    # row 1: continuation [7, 6, 6] from token 1; row 2: no 7, nothing dropped
    assert violated.tolist() == [
        [False, False, True, True, True, False],
        [False, True, True, True, False, False],
        [False] * 6,
    ]
    assert seen == [[7, 8, 9], [7, 6, 6], [2, 3, 4, 5, 6]]  # each row once, up to its last counted position
    # prefixes of two tokens or more: row 1's [7] is not judged, [7, 6] is
    two = violated_positions(ids, mask, probs, 0.5, min_tokens=2)
    assert two[1].tolist() == [False, False, True, True, False, False]
    assert two[0].tolist() == [False] * 6  # [7, 8] and on: diluted, never judged violating


@pytest.mark.parametrize("implementation", ["chunked", "fused"])
def test_violating_prefix_stop_drops_corpus_positions(implementation):
    policy, guidance = _models()
    batch = _batch(guidance.vocab_size)
    bad = int(batch["input_ids"][0, 4])  # row 0 violates once it has read its token 4
    settings = KLSettings(
        coef=1.0, implementation=implementation, positions="corpus", stop_at_violating_prefix=True
    )
    with pytest.raises(ValueError, match="needs prefix_probs"):
        ConstraintKL(guidance, lambda: policy, settings)

    def probs(rows):
        return [torch.tensor([0.0 if bad in row[: j + 1] else 1.0 for j in range(len(row))]) for row in rows]

    kl = ConstraintKL(guidance, lambda: policy, settings, prefix_probs=probs)
    supervised, targets = kl.corpus_mask(batch)
    with kl.capture() as captured:
        policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out = kl(batch, captured[0], supervised=supervised, targets=targets, n_corpus=3, denom=supervised.sum())
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z = guidance(batch["input_ids"], batch["attention_mask"])
        keep = supervised.clone()
        first = int(supervised[0].nonzero()[0])
        token_pos = first + 1 + [int(t) for t in batch["input_ids"][0, first + 1 :]].index(bad)
        keep[0, token_pos:] = False
        for row in (1, 2):  # the other rows only where they, too, read that token
            seq = [int(t) for t in batch["input_ids"][row]]
            start = int(supervised[row].nonzero()[0]) + 1
            if bad in seq[start:]:
                keep[row, start + seq[start:].index(bad) :] = False
        naive = constraint_kl_naive(logits, logits.detach(), z, keep, reduction="sum")
    assert 0 < out.metrics["kl_violated_share"] < 1
    assert keep.sum() < supervised.sum()
    assert float(out.terms["corpus"]) == pytest.approx(float(naive), rel=1e-4, abs=1e-6)
