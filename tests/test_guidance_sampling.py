"""Batched sampling (left padding, masks, log-probs), labelling, and NADO-guided decoding."""

from __future__ import annotations

import math

import pytest
import torch

from steer.constraints.base import Constraint
from steer.guidance import (
    GuidanceConfig,
    GuidanceModel,
    NADOLogitsProcessor,
    guided_generate,
    guided_sample,
    label_samples,
    sample_continuations,
)
from steer.models import tiny_causal_lm

PROMPTS = ["The cat", "A big dog is here today and", "x"]


@pytest.fixture
def eos_prone():
    """A tiny llama whose EOS logit is raised, so continuations end at varied positions."""
    model, tok = tiny_causal_lm("llama", seed=0)
    ids = torch.randint(6, 500, (8, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        direction = hidden.mean(0)
        model.lm_head.weight[tok.eos_token_id] = direction / direction.norm() ** 2 * 6.0
    return model, tok


def _teacher_forced_log_probs(model, batch):
    with torch.no_grad():
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (lp * batch.continuation_mask[:, 1:]).sum(-1)


def test_layout_masks_and_eos_handling(eos_prone):
    model, tok = eos_prone
    batch = sample_continuations(model, tok, PROMPTS, n_per_prompt=4, max_new_tokens=12, batch_size=5, seed=0)
    n, width = len(batch), batch.prompt_length
    assert n == 12 and batch.prompts == [p for p in PROMPTS for _ in range(4)]
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.continuation_mask.shape
    assert not batch.continuation_mask[:, :width].any()
    # Prompts are left-padded and right-aligned at column prompt_length.
    for row, prompt in enumerate(batch.prompts):
        ids = tok(prompt)["input_ids"]
        assert batch.input_ids[row, width - len(ids) : width].tolist() == ids
        assert batch.attention_mask[row, : width - len(ids)].sum() == 0
        assert (batch.input_ids[row, : width - len(ids)] == tok.pad_token_id).all()
    cont = batch.input_ids[:, width:]
    keep = batch.continuation_mask[:, width:]
    lengths = keep.sum(-1)
    ended = []
    for row in range(n):
        length = int(lengths[row])
        assert keep[row, :length].all() and not keep[row, length:].any()  # one contiguous span
        eos_positions = (cont[row, :length] == tok.eos_token_id).nonzero().view(-1).tolist()
        if eos_positions:  # EOS, if any, is the last kept token and occurs once
            assert eos_positions == [length - 1]
            ended.append(row)
        assert (cont[row, length:] == tok.pad_token_id).all()
        assert (batch.attention_mask[row, width + length :] == 0).all()
        assert (batch.attention_mask[row, width : width + length] == 1).all()
        expected_text = tok.decode(cont[row, :length].tolist(), skip_special_tokens=True)
        assert batch.texts[row] == expected_text
    assert ended and len(set(lengths.tolist())) > 2  # the fixture really ends sequences at varied places
    assert batch.continuation_lengths.tolist() == lengths.tolist()


def test_seq_log_probs_are_untempered_teacher_forced(eos_prone):
    model, tok = eos_prone
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9)]:
        batch = sample_continuations(
            model,
            tok,
            PROMPTS,
            n_per_prompt=2,
            max_new_tokens=8,
            temperature=temperature,
            top_p=top_p,
            seed=1,
        )
        torch.testing.assert_close(
            batch.seq_log_probs, _teacher_forced_log_probs(model, batch), atol=1e-4, rtol=1e-4
        )


def test_seeded_and_leaves_global_rng_alone(tiny_llama):
    model, tok = tiny_llama
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a = sample_continuations(model, tok, PROMPTS, n_per_prompt=2, max_new_tokens=6, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    b = sample_continuations(model, tok, PROMPTS, n_per_prompt=2, max_new_tokens=6, seed=3)
    c = sample_continuations(model, tok, PROMPTS, n_per_prompt=2, max_new_tokens=6, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and a.texts == b.texts
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_does_not_change_greedy_continuations(arch):
    model, tok = tiny_causal_lm(arch, seed=0)
    together = sample_continuations(model, tok, PROMPTS, max_new_tokens=8, temperature=0, batch_size=3)
    for row, prompt in enumerate(PROMPTS):
        alone = sample_continuations(model, tok, [prompt], max_new_tokens=8, temperature=0)
        assert alone.texts[0] == together.texts[row]


def test_restores_training_mode_and_handles_empty_prompt(tiny_llama):
    model, tok = tiny_llama
    model.train()
    batch = sample_continuations(model, tok, ["", "hello"], max_new_tokens=4, seed=0)
    assert model.training
    assert (
        batch.attention_mask[0, : batch.prompt_length].sum() == 1
    )  # the empty prompt became one start token
    with pytest.raises(TypeError):
        sample_continuations(model, tok, "a single string", max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        sample_continuations(model, tok, ["a"], top_p=0.0)


def test_select_keeps_rows_aligned(tiny_llama):
    model, tok = tiny_llama
    batch = sample_continuations(model, tok, PROMPTS, n_per_prompt=2, max_new_tokens=5, seed=0)
    picked = batch.select([4, 0])
    assert picked.prompts == [batch.prompts[4], batch.prompts[0]]
    assert picked.texts == [batch.texts[4], batch.texts[0]]
    assert torch.equal(picked.input_ids, batch.input_ids[[4, 0]])
    assert torch.equal(picked.seq_log_probs, batch.seq_log_probs[[4, 0]])
    mask = torch.tensor([True, False, True, False, False, True])
    assert len(batch.select(mask)) == 3 and picked.prompt_length == batch.prompt_length


class _LengthOracle(Constraint):
    """Satisfied probability from text length; NaN for texts containing a space (a failing backend)."""

    name = "length"

    def score(self, texts):
        return [math.nan if " " in t else min(1.0, len(t) / 20) for t in texts]


def test_label_samples_hard_soft_and_drops_failures(tiny_llama):
    model, tok = tiny_llama
    batch = sample_continuations(model, tok, PROMPTS, n_per_prompt=4, max_new_tokens=6, seed=0)
    failing = sum(" " in t for t in batch.texts)
    assert 0 < failing < len(batch)
    oracle = _LengthOracle()
    hard = label_samples(batch, oracle, threshold=0.3)
    assert hard.num_dropped == failing and len(hard) == len(batch) - failing
    assert oracle.stats["invalid"] == failing
    assert all(" " not in t for t in hard.batch.texts)
    expected = torch.tensor([min(1.0, len(t) / 20) for t in hard.batch.texts])
    torch.testing.assert_close(hard.scores, expected)
    torch.testing.assert_close(hard.labels, (expected >= 0.3).float())
    soft = label_samples(batch, oracle, label_mode="soft")
    torch.testing.assert_close(soft.labels, expected)
    plain = label_samples(batch, lambda texts: torch.tensor([float("nan")] + [1.0] * (len(texts) - 1)))
    assert plain.num_dropped == 1 and plain.batch.texts == batch.texts[1:]
    with pytest.raises(ValueError, match="label_mode"):
        label_samples(batch, oracle, label_mode="fuzzy")


def test_zero_guidance_decodes_like_the_policy(tiny_llama):
    model, tok = tiny_llama
    guidance = GuidanceModel(model, GuidanceConfig(lora_r=4))
    plain = sample_continuations(model, tok, PROMPTS, max_new_tokens=8, temperature=0)
    guided = guided_generate(model, guidance, tok, PROMPTS, max_new_tokens=8, temperature=0)
    assert guided == plain.texts


def test_guidance_steers_sampling_and_cache_matches_recompute(tiny_llama):
    model, tok = tiny_llama
    guidance = GuidanceModel(model, GuidanceConfig(lora_r=4))
    banned = torch.arange(200, model.config.vocab_size)
    with torch.no_grad():
        guidance.head.bias[banned] = -40.0  # R ~ 0 for the banned tokens
        guidance.head.weight.normal_(0, 0.3)  # context-dependent part, exercises the cache
    plain = sample_continuations(model, tok, PROMPTS, n_per_prompt=4, max_new_tokens=10, seed=0)
    width = plain.prompt_length
    assert torch.isin(plain.input_ids[:, width:][plain.continuation_mask[:, width:]], banned).any()
    cached = guided_sample(model, guidance, tok, PROMPTS, n_per_prompt=4, max_new_tokens=10, seed=0)
    recomputed = guided_sample(
        model, guidance, tok, PROMPTS, n_per_prompt=4, max_new_tokens=10, seed=0, use_cache=False
    )
    kept = cached.input_ids[:, width:][cached.continuation_mask[:, width:]]
    assert not torch.isin(kept, banned).any()
    assert torch.equal(cached.input_ids, recomputed.input_ids)
    # seq_log_probs stay those of the unguided policy.
    torch.testing.assert_close(
        cached.seq_log_probs, _teacher_forced_log_probs(model, cached), atol=1e-4, rtol=1e-4
    )


def test_processor_adds_logsigmoid_of_last_position(tiny_llama):
    model, _ = tiny_llama
    guidance = GuidanceModel(model, GuidanceConfig(lora_r=4))
    with torch.no_grad():
        guidance.head.weight.normal_(0, 0.5)
    ids = torch.randint(6, 500, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    processor = NADOLogitsProcessor(guidance, mask)
    scores = torch.randn(2, model.config.vocab_size)
    out = processor(ids, scores)
    expected = scores + torch.nn.functional.logsigmoid(guidance(ids, mask)[:, -1])
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)


def test_settled_rows_go_on_unguided(tiny_llama):
    """A row whose continuation already settles a monotone constraint gets the policy's scores; the others q*."""
    model, tok = tiny_llama
    guidance = GuidanceModel(model, GuidanceConfig(lora_r=4))
    with torch.no_grad():
        guidance.head.weight.normal_(0, 0.5)
    ids = torch.randint(6, 500, (3, 6), generator=torch.Generator().manual_seed(1))
    prompt_mask = torch.ones(3, 4, dtype=torch.long)
    calls = []

    def settled(continuation_ids):
        calls.append(continuation_ids.shape)
        return torch.tensor([True, False, True])

    processor = NADOLogitsProcessor(guidance, prompt_mask, use_cache=False, settled=settled)
    scores = torch.randn(3, model.config.vocab_size)
    out = processor(ids, scores)
    guided = scores + torch.nn.functional.logsigmoid(guidance(ids, torch.ones_like(ids))[:, -1])
    torch.testing.assert_close(out[[0, 2]], scores[[0, 2]])
    torch.testing.assert_close(out[1], guided[1].detach(), atol=1e-5, rtol=1e-5)
    assert calls == [(3, 2)]  # the continuation only, not the prompt
    # at the first step there is no continuation yet: every row is guided, settled is not asked
    first = processor(ids[:, :4], scores)
    assert calls == [(3, 2)] and not torch.allclose(first[0], scores[0])


def test_settled_by_needs_a_monotone_constraint(tiny_llama):
    from steer.constraints import KeywordConstraint
    from steer.guidance import settled_by

    _, tok = tiny_llama
    topic = KeywordConstraint(["vote", "senate"], mode="any_of")
    assert topic.monotone
    # a keyword settles the prefix once it is closed: "vote" at the very end may still become "voters"
    assert topic.prefix_satisfied(["we vote", "we vote.", "the Senate met", "voters", ""]) == [
        False,
        True,
        True,
        False,
        False,
    ]
    ids = tok(["we vote today", "no politics here"], return_tensors="pt", padding=True)["input_ids"]
    assert settled_by(topic, tok)(ids).tolist()[0] is True
    with pytest.raises(ValueError, match="not a monotone constraint"):
        settled_by(KeywordConstraint(["vote"], mode="none_of"), tok)
    with pytest.raises(NotImplementedError, match="not a monotone"):
        KeywordConstraint(["vote"], mode="all_of").prefix_satisfied(["vote"])
