"""The token prior (cache, invalidation, head start), the corpus-KL stop, sample rows, and the round guards."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from steer.constraints import CallableConstraint, KeywordConstraint
from steer.guidance import GuidanceConfig, GuidanceModel, guidance_loss, guidance_loss_from_hidden
from steer.guidance.objective import importance_weights
from steer.guidance.prior import prior_cache_path, prior_logits, token_prior, token_texts
from steer.models import tiny_causal_lm
from steer.trainers.constrained import ConstrainedConfig, ConstrainedTrainer
from steer.trainers.schedule import GuidanceLearner, GuidanceRoundError, RoundSettings

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingKeyword(KeywordConstraint):
    """A keyword oracle that counts how many texts it scored (to see whether the cache was used)."""

    def __init__(self, banned):
        super().__init__(banned=banned)
        self._calls = 0

    def score(self, texts):
        self._calls += len(texts)
        return super().score(texts)


def test_token_prior_scores_each_token_text_and_round_trips_its_cache(tmp_path):
    _, tokenizer = tiny_causal_lm("llama", seed=0)
    oracle = CountingKeyword(["rude"])
    prior = token_prior(oracle, tokenizer, cache_dir=tmp_path)
    texts = token_texts(tokenizer)
    assert prior.shape == (len(tokenizer),) and prior.dtype == torch.float32
    rude = [i for i, t in enumerate(texts) if t.strip() == "rude"]
    assert rude and all(prior[i] == 0.0 for i in rude)  # the oracle's own judgement of the token
    assert float(prior.mean()) > 0.9
    first_calls = oracle._calls
    assert first_calls > 0 and prior_cache_path(oracle, tokenizer, len(tokenizer), tmp_path).is_file()

    again = token_prior(oracle, tokenizer, cache_dir=tmp_path)
    assert oracle._calls == first_calls  # read from the cache, not re-scored
    assert torch.equal(again, prior)


def test_token_prior_cache_is_invalidated_by_another_oracle_or_tokenizer(tmp_path):
    _, tokenizer = tiny_causal_lm("llama", seed=0)
    a = token_prior(KeywordConstraint(banned=["rude"]), tokenizer, cache_dir=tmp_path)
    other_oracle = CountingKeyword(["calm"])
    b = token_prior(other_oracle, tokenizer, cache_dir=tmp_path)
    assert other_oracle._calls > 0 and not torch.equal(a, b)
    assert len(list(tmp_path.iterdir())) == 2

    oracle = CountingKeyword(["rude"])
    before = prior_cache_path(oracle, tokenizer, len(tokenizer), tmp_path)
    tokenizer.add_tokens(["brandnewtoken"])  # another vocabulary: another cache entry
    assert prior_cache_path(oracle, tokenizer, len(tokenizer), tmp_path) != before


def test_a_corrupt_cache_is_recomputed(tmp_path):
    _, tokenizer = tiny_causal_lm("llama", seed=0)
    oracle = CountingKeyword(["rude"])
    path = prior_cache_path(oracle, tokenizer, len(tokenizer), tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a safetensors file")
    prior = token_prior(oracle, tokenizer, cache_dir=tmp_path)
    assert oracle._calls > 0 and prior.shape == (len(tokenizer),)


def test_prior_logits_and_head_start():
    prior = torch.tensor([0.0, 0.5, 1.0, 0.9])
    bias = prior_logits(prior, floor=0.02)
    assert torch.allclose(torch.sigmoid(bias), torch.tensor([0.02, 0.5, 0.98, 0.9]), atol=1e-6)
    with pytest.raises(ValueError, match="floor"):
        prior_logits(prior, floor=0.6)
    model, _ = tiny_causal_lm("llama", seed=0)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    v = guidance.vocab_size
    bias = torch.linspace(-3, 3, v)
    guidance.init_head(bias)
    ids = torch.randint(0, v, (2, 5))
    z = guidance(ids)
    assert torch.allclose(z, bias.expand_as(z))  # z = bias in every context until training moves it
    with pytest.raises(ValueError, match="head bias"):
        guidance.init_head(torch.zeros(v + 1))


def test_importance_weight_cap_holds():
    # the old implementation clipped, then renormalised back above the cap ([3, 0, 0] for this input)
    w = importance_weights(torch.tensor([50.0, 0.0, 0.0]), torch.zeros(3), max_weight=1.5)
    assert float(w.max()) <= 1.5 + 1e-6 and float(w[1:].max()) < 1e-6
    gen = torch.Generator().manual_seed(0)
    log_w = torch.randn(200, generator=gen) * 3
    w = importance_weights(log_w, torch.zeros(200), max_weight=2.0)
    assert float(w.max()) <= 2.0 + 1e-6 and float(w.mean()) <= 1.0 + 1e-6
    # below the cap the weights are the self-normalised ratios, in order
    free = importance_weights(log_w, torch.zeros(200))
    assert abs(float(free.mean()) - 1.0) < 1e-4
    below = free < 2.0
    torch.testing.assert_close(w[below], free[below])
    # a gap of 100 nats neither overflows nor hands the cap to everyone
    w = importance_weights(torch.tensor([0.0] + [-100.0] * 7), torch.zeros(8), max_weight=5.0)
    assert float(w[0]) == 5.0 and float(w[1:].max()) < 1e-30


def test_guidance_loss_from_hidden_equals_the_full_vocabulary_loss():
    torch.manual_seed(0)
    batch, length, hidden_size, vocab = 3, 7, 5, 11
    hidden = torch.randn(batch, length, hidden_size, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab)
    ids = torch.randint(0, vocab, (batch, length))
    cont = torch.zeros(batch, length, dtype=torch.bool)
    cont[:, 3:] = True
    cont[1, 6] = False
    labels = torch.tensor([1.0, 0.0, 0.3])
    ref = torch.randn(batch, length, vocab)
    weights = torch.tensor([1.0, 2.0, 0.5])
    a, ma = guidance_loss(
        head(hidden), ids, cont, labels, weights=weights, consistency_coef=0.7, ref_logits=ref
    )
    b, mb = guidance_loss_from_hidden(
        hidden,
        head,
        ids,
        cont,
        labels,
        weights=weights,
        consistency_coef=0.7,
        ref_logits_fn=lambda i, t: ref[i, t],
    )
    assert abs(float(a) - float(b)) < 1e-6
    assert ma.keys() == mb.keys() and all(abs(ma[k] - mb[k]) < 1e-5 for k in ma)
    for x, y in zip(
        torch.autograd.grad(a, [hidden, head.weight]), torch.autograd.grad(b, [hidden, head.weight])
    ):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- trainer
def _trainer(tmp_path, constraint=None, **overrides):
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    words = "the cat is rude and the dog is calm but rude".split()
    corpus = Dataset.from_dict(
        {"prompt": ["The cat", "A dog", "It was", "The bird"], "completion": [" " + " ".join(words)] * 4}
    )
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        max_length=32,
        seed=0,
        kl_coef=1.0,
        guidance_interval=1,
        guidance_steps_per_round=1,
        guidance_batch_size=4,
        guidance_lora_r=4,
        samples_per_round=8,
        sample_max_new_tokens=6,
        sample_batch_size=8,
        guidance_prior_cache_dir=str(tmp_path / "priors"),
        disable_tqdm=True,
    )
    values.update(overrides)
    return ConstrainedTrainer(
        model,
        ConstrainedConfig(**values),
        train_dataset=corpus,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        constraint=constraint or KeywordConstraint(banned=["rude"]),
        prompt_dataset=Dataset.from_dict({"prompt": ["The cat", "A dog"]}),
    )


def test_trainer_starts_the_head_from_the_token_prior_and_stops_the_corpus_kl_at_a_violation(tmp_path):
    trainer = _trainer(tmp_path)
    flagged = trainer.priors.flagged
    assert flagged is not None and 0 < int(flagged.sum()) < flagged.numel()
    r = torch.sigmoid(trainer.guidance.head.bias.detach())
    assert float(r[flagged].max()) <= 0.021 and float(r[~flagged].min()) > 0.5

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    supervised, targets = trainer.constraint_kl.corpus_mask(batch)
    kept = trainer.constraint_kl.corpus_kl_mask(batch, supervised, targets)
    for row in range(supervised.shape[0]):
        hits = [
            t for t in range(supervised.shape[1]) if supervised[row, t] and bool(flagged[targets[row, t]])
        ]
        assert hits, "the corpus has a flagged token in every completion"
        first = hits[0]
        # every supervised position up to and including the first flagged target counts, none after it
        assert bool(kept[row, : first + 1].eq(supervised[row, : first + 1]).all())
        assert not bool(kept[row, first + 1 :].any())
    off = _trainer(tmp_path, kl_corpus_stop_at_violation=False)
    assert torch.equal(off.constraint_kl.corpus_kl_mask(batch, supervised, targets), supervised)


def test_kl_on_samples_appends_policy_samples_that_sft_ignores(tmp_path):
    trainer = _trainer(tmp_path, kl_positions="samples", kl_sample_batch_size=3)
    trainer.run_due_rounds()  # the warm-up round fills the sample pool
    assert len(trainer.schedule.samples) > 0
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    rows = trainer._sample_rows()
    assert rows["input_ids"].shape[0] == min(3, len(trainer.schedule.samples))
    joined = trainer.constraint_kl.append_rows(batch, rows, 0)
    n = batch["input_ids"].shape[0]
    assert joined["input_ids"].shape[0] == n + rows["input_ids"].shape[0]
    assert bool((joined["labels"][n:] == -100).all())  # SFT never learns from the policy's own samples
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["kl_samples"][-1] >= 0
    assert "kl" not in trainer._metrics["train"]  # kl_positions='samples': no corpus term


def test_kl_sample_coef_weights_the_sample_term_alone(tmp_path):
    losses = {}
    for coef in (None, 0.0, 4.0):
        trainer = _trainer(tmp_path, kl_positions="samples", kl_sample_batch_size=3, kl_sample_coef=coef)
        trainer.run_due_rounds()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        torch.manual_seed(0)
        losses[coef] = float(trainer.compute_loss(trainer.model, dict(batch)).detach())
        samples = trainer._metrics["train"].get("kl_samples", [])
        if coef == 0.0:
            assert not samples  # weight 0: no sample rows appended, no sample term
        else:
            assert samples[-1] > 0
    # kl_coef=1 by default, so the default run adds 1 x KL and the 4.0 run 4 x the same KL
    sft = losses[0.0]
    assert losses[None] > sft
    assert losses[4.0] - sft == pytest.approx(4.0 * (losses[None] - sft), rel=1e-3)
    with pytest.raises(ValueError, match="kl_sample_coef"):
        _trainer(tmp_path, kl_sample_coef=-1.0)


def test_a_zero_sample_coef_is_the_corpus_only_kl(tmp_path):
    """kl_positions both + kl_sample_coef 0 (how the shipped recipe was selected) = kl_positions corpus."""
    losses = []
    for overrides in ({"kl_positions": "both", "kl_sample_coef": 0.0}, {"kl_positions": "corpus"}):
        trainer = _trainer(tmp_path, **overrides)
        trainer.run_due_rounds()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        losses.append(float(trainer.compute_loss(trainer.model, dict(batch)).detach()))
        assert trainer._metrics["train"]["kl"][-1] > 0 and "kl_samples" not in trainer._metrics["train"]
    assert losses[0] == losses[1]


def test_a_round_without_usable_labels_fails_loudly(tmp_path):
    policy, tokenizer = tiny_causal_lm("llama", seed=0)
    policy = get_peft_model(policy, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    broken = CallableConstraint(lambda texts: [math.nan] * len(texts), name="broken")
    learner = GuidanceLearner(
        policy,
        guidance,
        tokenizer,
        broken,
        ["The cat", "A dog"],
        RoundSettings(samples_per_round=4, sample_max_new_tokens=4, sample_batch_size=4),
        lr=1e-3,
        seed=0,
    )
    with pytest.raises(GuidanceRoundError, match="none of the 4 policy samples has a usable label"):
        learner.run_round(0)

    always = CallableConstraint(lambda texts: [1.0] * len(texts), name="always")
    learner.constraint = always
    with pytest.warns(RuntimeWarning, match="all 4 samples are labelled satisfied"):
        learner.run_round(1)


def test_the_plain_sft_baseline_runs_no_rounds_and_computes_no_prior(tmp_path):
    trainer = _trainer(tmp_path, kl_coef=0.0)
    assert trainer.priors.token is None
    trainer.train()
    assert trainer.rounds_started == 0
    assert not (tmp_path / "priors").exists()


def test_a_run_writes_its_metrics_file_and_training_curves(tmp_path):
    import json

    trainer = _trainer(tmp_path)
    trainer.train()
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("guidance/auc_samples" in line for line in lines) and any("lm_loss" in line for line in lines)
    png = out / "training_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_reference_weights_guidance_samples_by_importance(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, kl_reference="base", importance_max_weight=3.0)
    learner = trainer.schedule.learner
    assert learner.settings.importance_max_weight == 3.0
    seen = []
    original = learner._importance

    def spy(batch):
        weights = original(batch)
        seen.append(weights)
        return weights

    monkeypatch.setattr(learner, "_importance", spy)
    trainer.run_due_rounds()
    assert seen and all(float(w.max()) <= 3.0 + 1e-6 and float(w.min()) >= 0 for w in seen)
    # the policy reference needs none: its samples come from the distribution R is estimated under
    assert _trainer(tmp_path, kl_reference="policy").schedule.learner.settings.importance_max_weight is None


def test_zero_guidance_steps_keep_r_at_its_priors_while_rounds_still_sample(tmp_path):
    """guidance_steps_per_round 0 is the priors-only ablation: rounds draw and label samples, R never moves."""
    trainer = _trainer(tmp_path, guidance_steps_per_round=0, kl_positions="both")
    before = {n: p.detach().clone() for n, p in trainer.guidance.named_parameters()}
    trainer.train()
    assert len(trainer.round_history) >= 2 and len(trainer.schedule.samples) > 0
    history = trainer.round_history
    assert history and all("guidance/loss" not in row for row in history)
    for name, param in trainer.guidance.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
    # one step per round moves the head away from its priors
    moved = _trainer(tmp_path, guidance_steps_per_round=1, kl_positions="both")
    moved.train()
    assert not torch.equal(moved.guidance.head.bias.detach(), before["head.bias"])


def test_a_topic_constraint_starts_r_high_at_its_words_and_at_the_base_rate_elsewhere(tmp_path):
    """token_evidence 'satisfaction' (any_of): a token whose text holds a keyword settles the constraint, the
    others say nothing about it, so nothing is flagged and the corpus KL never stops early."""
    constraint = KeywordConstraint(["rude"], mode="any_of")
    assert constraint.token_evidence == "satisfaction"
    assert KeywordConstraint(banned=["rude"]).token_evidence == "violation"
    assert KeywordConstraint(["rude", "calm"], mode="all_of").token_evidence == "none"

    trainer = _trainer(tmp_path, constraint=constraint)
    priors = trainer.priors
    assert priors.flagged is None and priors.context is None
    settles = ~priors.label_rows
    assert 0 < int(settles.sum()) < settles.numel()
    bias = trainer.guidance.head.bias.detach()
    assert float(torch.sigmoid(bias[settles]).min()) >= 0.97
    assert bool((bias[~settles] == 0).all())  # no evidence yet

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    supervised, targets = trainer.constraint_kl.corpus_mask(batch)
    assert torch.equal(trainer.constraint_kl.corpus_kl_mask(batch, supervised, targets), supervised)

    trainer.run_due_rounds()  # the warm-up round: the others start at its satisfaction rate
    labels = [label for _, _, label in trainer.schedule.learner.buffer.items()]
    rate = min(max(sum(labels) / len(labels), 0.02), 0.98)
    bias = trainer.guidance.head.bias.detach()
    expected = math.log(rate / (1 - rate))
    # one guidance step moved the bias a little from where the warm-up round put it
    assert abs(float(bias[~settles].mean()) - expected) < 0.05
    assert float(torch.sigmoid(bias[settles]).min()) >= 0.95

    every = _trainer(tmp_path, constraint=KeywordConstraint(["rude", "calm"], mode="all_of"))
    assert every.priors.token is None and every.priors.flagged is None and bool(every.priors.label_rows.all())


def test_an_oracle_that_flags_most_tokens_on_their_own_gets_a_warning(tmp_path, caplog):
    """A contextual classifier unsure of single tokens scores most of them near 0.5; at the 0.5 threshold its
    flags (which stop the corpus KL) are a coin flip, so the run says so; a lexical oracle's few flags do not."""
    from steer.guidance.oracle_priors import FLAGGED_WARN_SHARE, oracle_priors

    _, tokenizer = tiny_causal_lm("llama", seed=0)
    unsure = CallableConstraint(lambda texts: [0.45 if len(t) % 3 else 0.55 for t in texts], name="unsure")
    lexical = CallableConstraint(lambda texts: [0.0 if "x" in t else 0.9 for t in texts], name="lexical")
    for constraint, warned in ((unsure, True), (lexical, False)):
        caplog.clear()
        with caplog.at_level("INFO", logger="steer.guidance.oracle_priors"):
            priors = oracle_priors(
                constraint,
                tokenizer,
                512,
                token_head=False,
                token_flags=True,
                cache_dir=tmp_path / constraint.name,
            )
        share = float(priors.flagged.float().mean())
        assert (share > FLAGGED_WARN_SHARE) is warned
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(warnings) is warned, warnings
        if warned:
            assert "unsure flags" in warnings[0] and "kl_corpus_stop_at_violation false" in warnings[0]
    # with the stops off the flags stop nothing: no warning
    caplog.clear()
    with caplog.at_level("INFO", logger="steer.guidance.oracle_priors"):
        oracle_priors(
            unsure, tokenizer, 512, token_head=True, token_flags=False, cache_dir=tmp_path / "unsure"
        )
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
