"""The context prior: split words the oracle flags, as fixed offsets of the guidance logits z."""

from __future__ import annotations

import math

import pytest
import torch

from steer.constraints import KeywordConstraint
from steer.guidance import GuidanceModel, guidance_loss, guidance_loss_from_hidden
from steer.guidance.context_prior import MAX_PREFIX, ContextPrior, context_prior, lexicon
from steer.guidance.decoding import NADOLogitsProcessor
from steer.guidance.prior import prior_logits, token_prior
from steer.models import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

W = -1  # wildcard slot


def _prior() -> ContextPrior:
    # "7 8 -> 9" (two-token prefix), "8 -> 9" (one token, wildcard on the left), "5 -> 6"
    return ContextPrior(
        torch.tensor([[W, 7, 8], [W, W, 8], [W, W, 5]]),
        torch.tensor([9, 9, 6]),
        torch.tensor([-4.0, -1.0, -2.0]),
    )


def test_contexts_are_the_last_tokens_and_padding_matches_nothing():
    prior = _prior()
    ids = torch.tensor([[1, 7, 8, 3], [0, 0, 5, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    ctx = prior.contexts(ids, mask)
    assert ctx.shape == (2, 4, MAX_PREFIX)
    assert ctx[0, 2].tolist() == [1, 7, 8]
    assert ctx[0, 0].tolist() == [-2, -2, 1]  # before the start: no token
    assert ctx[1, 3].tolist() == [-2, 5, 8]  # left padding: no token


def test_add_offsets_at_and_flags_agree_and_the_lowest_overlapping_offset_counts():
    prior = _prior()
    ctx = torch.tensor([[1, 7, 8], [4, 4, 8], [4, 4, 5], [4, 4, 4]])
    z = torch.zeros(4, 12)
    prior.add_(z, ctx)
    expected = torch.zeros(4, 12)
    expected[0, 9] = -4.0  # both "7 8 -> 9" and "8 -> 9" match: the word inside a longer one, not a sum
    expected[1, 9] = -1.0
    expected[2, 6] = -2.0
    torch.testing.assert_close(z, expected)
    tokens = torch.tensor([9, 9, 6, 9])
    torch.testing.assert_close(prior.offsets_at(ctx, tokens), torch.tensor([-4.0, -1.0, -2.0, 0.0]))
    assert prior.flags_at(ctx, tokens).tolist() == [True, True, True, False]
    assert prior.flags_at(ctx, torch.tensor([3, 3, 3, 3])).tolist() == [False] * 4
    empty = ContextPrior(torch.zeros(0, MAX_PREFIX), torch.zeros(0), torch.zeros(0))
    assert empty.offsets_at(ctx, tokens).tolist() == [0.0] * 4 and not empty.flags_at(ctx, tokens).any()


def test_state_round_trip_and_bad_shapes():
    prior = _prior()
    again = ContextPrior.from_state(prior.state())
    z1, z2 = torch.zeros(1, 12), torch.zeros(1, 12)
    ctx = torch.tensor([[1, 7, 8]])
    torch.testing.assert_close(prior.add_(z1, ctx), again.add_(z2, ctx))
    with pytest.raises(ValueError, match="missing tensors"):
        ContextPrior.from_state({"tokens": prior.tokens})
    with pytest.raises(ValueError, match="prefixes"):
        ContextPrior(torch.zeros(3), torch.zeros(3), torch.zeros(3))


def test_lexicon_reads_lower_cased_words():
    assert lexicon(["The BAD cat, bad!", "x 42 ok-go"]) == ["bad", "cat", "go", "ok", "the"]


# --------------------------------------------------------------------------------------------- building
def _built(tmp_path, constraint=None, words=("bad", "cat", "the", "rude")):
    tokenizer = tiny_tokenizer()
    constraint = constraint or KeywordConstraint(banned=["bad", "rude"])
    tprior = token_prior(constraint, tokenizer, 512, cache_dir=tmp_path)
    prior = context_prior(constraint, tokenizer, list(words), tprior, floor=0.02, cache_dir=tmp_path)
    return tokenizer, constraint, tprior, prior


def test_split_flagged_words_get_their_completing_token(tmp_path):
    tokenizer, _, tprior, prior = _built(tmp_path)
    bad = tokenizer(" bad", add_special_tokens=False)["input_ids"]
    cat = tokenizer(" cat", add_special_tokens=False)["input_ids"]
    assert len(bad) == 2 and len(cat) == 2  # the tiny tokenizer splits both; only "bad" is banned
    assert tprior[bad].min() > 0.5  # neither piece of " bad" is flagged on its own text
    ctx = prior.contexts(torch.tensor([bad]))[0, :1]
    z = prior_logits(tprior, floor=0.02)[bad[1]] + prior.offsets_at(ctx, torch.tensor(bad[1:]))
    assert math.isclose(float(z), math.log(0.02 / 0.98), rel_tol=1e-5)  # starts at the word's own score
    assert prior.flags_at(ctx, torch.tensor(bad[1:])).item()
    ctx_cat = prior.contexts(torch.tensor([cat]))[0, :1]
    assert not prior.flags_at(ctx_cat, torch.tensor(cat[1:])).item()
    assert (prior.offsets < 0).all()
    # " rude" is one token: the token prior already carries it, no entry needed
    rude = tokenizer(" rude", add_special_tokens=False)["input_ids"]
    assert len(rude) == 1 and not (prior.tokens == rude[0]).any()


def test_cache_round_trips_and_is_invalidated_by_words_and_oracle(tmp_path, monkeypatch):
    tokenizer, constraint, tprior, prior = _built(tmp_path)
    files = sorted(tmp_path.glob("context_prior-*.safetensors"))
    assert len(files) == 1

    def refuse(texts):
        raise AssertionError("the oracle was called although the cache holds this prior")

    monkeypatch.setattr(constraint, "evaluate", refuse)
    again = context_prior(
        constraint, tokenizer, ["cat", "bad", "the", "rude"], tprior, floor=0.02, cache_dir=tmp_path
    )
    assert torch.equal(again.tokens, prior.tokens) and torch.equal(again.offsets, prior.offsets)
    monkeypatch.undo()
    context_prior(constraint, tokenizer, ["bad", "cat"], tprior, floor=0.02, cache_dir=tmp_path)
    other = KeywordConstraint(banned=["cat"])
    changed = context_prior(other, tokenizer, ["bad", "cat"], tprior, floor=0.02, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("context_prior-*.safetensors"))) == 3
    cat = tokenizer(" cat", add_special_tokens=False)["input_ids"]
    assert changed.flags_at(changed.contexts(torch.tensor([cat]))[0, :1], torch.tensor(cat[1:])).item()
    files[0].write_bytes(b"not a safetensors file")  # a corrupt cache is recomputed, never trusted
    fresh = context_prior(
        constraint, tokenizer, ["bad", "cat", "the", "rude"], tprior, floor=0.02, cache_dir=tmp_path
    )
    assert torch.equal(fresh.tokens, prior.tokens)


# --------------------------------------------------------------------------------------------- the model
def _policy():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def _guidance(tmp_path):
    policy, tokenizer = _policy()
    guidance = GuidanceModel(policy)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        guidance.head.weight.copy_(torch.randn(guidance.head.weight.shape, generator=gen) * 0.1)
    _, _, _, prior = _built(tmp_path)
    guidance.set_context_prior(prior)
    return guidance, tokenizer


def test_forward_adds_the_offsets_and_cached_decoding_agrees(tmp_path):
    guidance, tokenizer = _guidance(tmp_path)
    ids = torch.tensor([tokenizer("The bad cat is bad", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        z = guidance(ids)
        plain = torch.nn.functional.linear(
            guidance.hidden_states(ids), guidance.head.weight, guidance.head.bias
        )
    diff = z - plain
    bad = tokenizer(" bad", add_special_tokens=False)["input_ids"]
    positions = (ids[0, :-1] == bad[0]).nonzero().view(-1)
    assert positions.numel() == 2
    for t in positions.tolist():
        assert diff[0, t, bad[1]] < -1.0
    assert int((diff.abs() > 1e-6).sum()) >= 2
    # the processor used by guided decoding: incremental (cached) = full recomputation
    mask = torch.ones_like(ids[:, :2])
    cached, full = (NADOLogitsProcessor(guidance, mask, use_cache=flag) for flag in (True, False))
    scores = torch.zeros(1, guidance.vocab_size)
    for length in range(2, ids.shape[1] + 1):
        torch.testing.assert_close(
            cached(ids[:, :length], scores), full(ids[:, :length], scores), atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="full_input_ids"):
        from transformers import DynamicCache

        guidance(ids[:, -1:], torch.ones_like(ids), cache=DynamicCache())


def test_save_and_load_carry_the_context_prior(tmp_path):
    guidance, tokenizer = _guidance(tmp_path)
    guidance.save_pretrained(tmp_path / "g")
    loaded = GuidanceModel.from_pretrained(tmp_path / "g", _policy()[0])
    ids = torch.tensor([tokenizer("The bad cat", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), guidance(ids))
    guidance.set_context_prior(None)  # saving without one removes a stale file
    guidance.save_pretrained(tmp_path / "g")
    assert GuidanceModel.from_pretrained(tmp_path / "g", _policy()[0]).context_prior is None
    with pytest.raises(ValueError, match="vocabulary size"):
        guidance.set_context_prior(
            ContextPrior(torch.tensor([[W, W, 1]]), torch.tensor([10**6]), torch.tensor([-1.0]))
        )
    with pytest.raises(TypeError, match="ContextPrior"):
        guidance.set_context_prior({"tokens": 1})


def test_guidance_loss_from_hidden_sees_the_offsets(tmp_path):
    """The gathered BCE and the consistency term equal the full-vocabulary loss on ``z = guidance(ids)``."""
    guidance, tokenizer = _guidance(tmp_path)
    texts = ["The bad cat is bad and rude", "A dog was good and calm"]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    cont = torch.zeros_like(ids, dtype=torch.bool)
    cont[:, 2:] = enc["attention_mask"][:, 2:].bool()
    labels = torch.tensor([0.0, 1.0])
    ref = torch.randn(
        ids.shape[0], ids.shape[1], guidance.vocab_size, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        hidden = guidance.hidden_states(ids)
        z = guidance(ids)
        full, _ = guidance_loss(z, ids, cont, labels, consistency_coef=0.5, ref_logits=ref)
        common = dict(consistency_coef=0.5, ref_logits_fn=lambda b, t: ref[b, t])
        gathered, _ = guidance_loss_from_hidden(
            hidden, guidance.head, ids, cont, labels, guidance=guidance, **common
        )
        without, _ = guidance_loss_from_hidden(hidden, guidance.head, ids, cont, labels, **common)
    torch.testing.assert_close(gathered, full, atol=1e-5, rtol=1e-5)
    assert abs(float(without) - float(full)) > 1e-3  # the offsets matter here


# --------------------------------------------------------------------------------------------- the trainer
def test_trainer_needs_the_token_prior_for_a_context_prior(tmp_path):
    from steer.trainers.constrained import ConstrainedConfig

    with pytest.raises(ValueError, match="ConstrainedConfig.guidance_context_prior"):
        ConstrainedConfig(
            output_dir=str(tmp_path), use_cpu=True, guidance_context_prior="corpus", guidance_prior="none"
        )
    with pytest.raises(ValueError, match="ConstrainedConfig.guidance_context_prior"):
        ConstrainedConfig(output_dir=str(tmp_path), use_cpu=True, guidance_context_prior="words")


def test_corpus_kl_stops_where_a_split_flagged_word_completes(tmp_path):
    """ " bad" is " b" + "ad" for the tiny tokenizer: the token prior flags neither piece, so only the context prior
    stops the corpus KL at "ad" (and the guidance model's z there starts at the word's own score)."""
    from datasets import Dataset
    from helpers import constrained as ct

    corpus = Dataset.from_dict({"text": ["The cat is bad and the dog is good."] * 8})
    masks = {}
    for mode in ("none", "corpus"):
        trainer = ct.trainer(
            tmp_path / mode,
            train=corpus,
            guidance_context_prior=mode,
            guidance_prior_cache_dir=str(tmp_path / "priors"),
        )
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        supervised, targets = trainer.constraint_kl.corpus_mask(batch)
        masks[mode] = trainer.constraint_kl.corpus_kl_mask(batch, supervised, targets)
    tokenizer = trainer._tokenizer
    ad = tokenizer(" bad", add_special_tokens=False)["input_ids"][1]
    at_ad = (targets == ad) & supervised
    assert at_ad.any()
    after = (at_ad.long().cumsum(1) - at_ad.long()) > 0  # positions after the completion
    after &= supervised
    assert after.any()
    assert masks["none"][after].all()  # without the context prior the KL runs on past the word
    assert masks["corpus"][at_ad].all()  # with it, the KL counts at the completion (where q* lowers it) ...
    assert not masks["corpus"][after].any()  # ... and nowhere after it
    assert masks["corpus"].sum() < masks["none"].sum()
    ids = batch["input_ids"][:1]
    with torch.no_grad():
        z = trainer.guidance(ids)
    t = int(at_ad[0].nonzero()[0])
    assert float(torch.sigmoid(z[0, t, ad])) < 0.05
