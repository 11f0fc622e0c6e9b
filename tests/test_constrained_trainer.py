"""ConstrainedTrainer: config validation, the loss decomposition, rounds, schedules, resume and export."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from helpers.constrained import config as _config
from helpers.constrained import corpus as _corpus
from helpers.constrained import lora as _lora
from helpers.constrained import losses as _losses
from helpers.constrained import trainer as _trainer
from helpers.constrained import values as _values
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from steer.constraints import KeywordConstraint, build_constraint
from steer.errors import UserInputError
from steer.guidance import GuidanceModel, constraint_kl_naive
from steer.models import tiny_causal_lm
from steer.scripts.constrained import ConstrainedScriptArguments, filter_by_constraint

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kl_coef", -0.1),
        ("kl_coef", float("nan")),
        ("kl_reference", "teacher"),
        ("kl_chunk_size", 0),
        ("kl_implementation", "triton"),
        ("guidance_backbone", "mlp"),
        ("guidance_lr", 0.0),
        ("guidance_steps_per_round", -1),
        ("guidance_interval", 0),
        ("samples_per_round", 0),
        ("sample_max_new_tokens", 0),
        ("sample_temperature", 0.0),
        ("sample_top_p", 1.5),
        ("label_mode", "fuzzy"),
        ("label_threshold", 1.2),
        ("consistency_coef", -1.0),
        ("schedule", "async"),
        ("sample_buffer_size", 0),
        ("guidance_holdout_fraction", 1.0),
        ("importance_weighting", "prefix"),
        ("policy_export_weight", 0.0),
        ("policy_export_weight", 1.2),
        ("policy_export_weight", float("nan")),
        ("guidance_token_rows", False),  # without guidance_shared_logit nothing in the head would learn
        ("guidance_token_rank", -1),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"ConstrainedConfig.{field}"):
        _config(tmp_path, **{field: value})


def test_packing_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="ConstrainedConfig.packing"):
        _config(tmp_path, packing=True)


def test_prompt_dataset_without_prompt_column(tmp_path):
    with pytest.raises(ValueError, match=r"no 'prompt' column \(found columns: \['text'\]\)"):
        _trainer(tmp_path, prompts=Dataset.from_dict({"text": ["a", "b"]}))


def test_lora_guidance_needs_a_peft_policy(tmp_path):
    with pytest.raises(ValueError, match="guidance_backbone"):
        _trainer(tmp_path, peft=False)


def test_script_arguments_and_constraint_factory():
    args = ConstrainedScriptArguments(constraint="keyword", constraint_kwargs='{"banned": ["bad"]}')
    constraint = build_constraint(args.constraint, args.constraint_kwargs)
    assert constraint(["a bad cat", "a good cat"]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="unknown constraint"):
        build_constraint("nope")
    with pytest.raises(ValueError, match="constraint_kwargs"):
        ConstrainedScriptArguments(constraint_kwargs="{not json")


def test_corpus_filtered_to_the_constraint():
    """corpus_min_satisfaction: the filtered-SFT baseline trains on the records whose completion satisfies the
    constraint; a filter that keeps nothing is one line naming the setting."""
    constraint = build_constraint("topic", {"topic": "space"})
    train = Dataset.from_dict(
        {"prompt": ["a", "b", "c"], "completion": [" the rocket left", " a quiet day", " stars and planets"]}
    )
    kept = filter_by_constraint(train, constraint, 0.5)
    assert kept["completion"] == [" the rocket left", " stars and planets"]
    text_only = Dataset.from_dict({"text": ["no topic here"]})
    with pytest.raises(UserInputError, match=r"corpus_min_satisfaction=0.5 keeps none of the 1 .*'text'"):
        filter_by_constraint(text_only, constraint, 0.5)
    with pytest.raises(UserInputError, match="'completion' or 'text' column"):
        filter_by_constraint(
            Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]}), constraint, 0.5
        )


# --------------------------------------------------------------------------------------------- the loss
def test_lambda_zero_reproduces_plain_sft(tmp_path):
    constrained = _trainer(tmp_path, kl_coef=0.0)
    constrained.train()
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    values = _values(tmp_path / "sft")
    plain_args = SFTConfig(**{k: v for k, v in values.items() if k in SFTConfig.__dataclass_fields__})
    plain = SFTTrainer(
        model, plain_args, train_dataset=_corpus(), processing_class=tokenizer, peft_config=_lora()
    )
    plain.train()
    a, b = _losses(constrained), _losses(plain)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    # ... and the baseline spends nothing on guidance rounds.
    assert constrained.rounds_started == 0


def test_loss_is_sft_plus_lambda_kl(tmp_path):
    trainer = _trainer(tmp_path, kl_coef=0.7, kl_corpus_stop_at_violation=False)
    with torch.no_grad():  # a guidance model that is far from R = 0.5
        trainer.guidance.head.weight.normal_(0, 0.3)
        trainer.guidance.head.bias.normal_(0, 1.0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ]
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        log_p = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        sft = -log_p[mask].sum() / mask.sum()
        z = trainer.guidance(batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1]
        kl = constraint_kl_naive(logits, logits, z, mask)
    assert float(kl) > 1e-3
    assert abs(float(loss) - float(sft + 0.7 * kl)) < 1e-5
    assert abs(trainer._metrics["train"]["kl"][-1] - float(kl)) < 1e-5
    assert abs(trainer._metrics["train"]["lm_loss"][-1] - float(sft)) < 1e-5


def test_gradient_accumulation_matches_a_full_batch(tmp_path):
    def run(path, batch, accumulation):
        trainer = _trainer(
            path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=2
        )
        trainer.train()
        return _losses(trainer), [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]

    full_losses, full_params = run(tmp_path / "a", 4, 1)
    acc_losses, acc_params = run(tmp_path / "b", 2, 2)
    assert max(abs(x - y) for x, y in zip(full_losses, acc_losses)) < 1e-5
    assert max(float((x - y).abs().max()) for x, y in zip(full_params, acc_params)) < 1e-5


def test_kl_reference_base(tmp_path):
    trainer = _trainer(tmp_path, kl_reference="base", max_steps=2)
    trainer.train()
    losses = _losses(trainer)
    assert all(math.isfinite(x) for x in losses)
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls[-1] > 0  # the policy moved away from the base, so KL(q*[base] || p) > 0


def test_kl_reference_adapter(tmp_path):
    """kl_reference_adapter: a plain-SFT run's adapter becomes the frozen reference (its logits, not the base's,
    are what ``reference_model`` yields, before and after training), the policy starts from its weights and
    trains away from it, and only the policy adapter is saved."""
    from steer.models import REFERENCE_ADAPTER, reference_model

    sft = _trainer(tmp_path / "sft", kl_coef=0.0, max_steps=3, learning_rate=3e-2)
    sft.train()
    sft.save_model(str(tmp_path / "sft_out"))
    saved_config = tmp_path / "sft_out" / "adapter_config.json"  # a dropout the reference must not apply
    text = saved_config.read_text()
    assert '"lora_dropout": 0.0' in text
    saved_config.write_text(text.replace('"lora_dropout": 0.0', '"lora_dropout": 0.5'))
    batch = {
        "input_ids": torch.tensor([[5, 9, 17, 3, 8, 21]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
    }
    with torch.no_grad():
        sft_logits = sft.model(**batch).logits
        with sft.model.disable_adapter():
            base_logits = sft.model(**batch).logits
    assert float((sft_logits - base_logits).abs().max()) > 1e-3  # the SFT adapter moved the model

    trainer = _trainer(
        tmp_path / "ref", kl_reference="base", kl_reference_adapter=str(tmp_path / "sft_out"), max_steps=3
    )
    model = trainer.model
    reference = [p for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n]
    assert reference and not any(p.requires_grad for p in reference)
    before = [p.detach().clone() for p in reference]
    with torch.no_grad():  # the policy starts at the SFT model
        assert float((model(**batch).logits - sft_logits).abs().max()) < 1e-5
    model.train()
    with torch.no_grad(), reference_model(model):  # deterministic in training mode
        assert torch.equal(model(**batch).logits, model(**batch).logits)
    trainer.train()
    model.eval()
    with torch.no_grad():
        policy_logits = model(**batch).logits
        with reference_model(model):
            ref_logits = model(**batch).logits
    assert float((ref_logits - sft_logits).abs().max()) < 1e-5  # the reference stayed the SFT model
    assert float((policy_logits - sft_logits).abs().max()) > 1e-4  # the policy trained away from it
    assert all(torch.equal(a, b) for a, b in zip(before, reference))
    assert model.active_adapter == trainer._policy_adapter
    trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out" / REFERENCE_ADAPTER).exists()
    saved = PeftModel.from_pretrained(tiny_causal_lm("llama", seed=0)[0], str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert float((saved(**batch).logits - policy_logits).abs().max()) < 1e-4


def test_kl_reference_adapter_bad_input(tmp_path):
    with pytest.raises(ValueError, match="kl_reference_adapter"):
        _config(tmp_path, kl_reference="policy", kl_reference_adapter=str(tmp_path))
    with pytest.raises(Exception, match="kl_reference_adapter.*adapter_config.json"):
        _trainer(tmp_path, kl_reference="base", kl_reference_adapter=str(tmp_path))
    twin = _trainer(
        tmp_path, kl_coef=0.0, kl_reference="base", kl_reference_adapter=str(tmp_path / "not_yet")
    )
    assert (
        "reference" not in twin.model.peft_config
    )  # the plain-SFT twin that trains the reference ignores it
    odd = tmp_path / "odd"
    lora = _lora()
    lora.r = 8
    from peft import get_peft_model

    get_peft_model(tiny_causal_lm("llama", seed=0)[0], lora).save_pretrained(str(odd))
    with pytest.raises(Exception, match="LoRA r is 8, the policy's 4"):
        _trainer(tmp_path, kl_reference="base", kl_reference_adapter=str(odd))


def test_policy_init_adapter(tmp_path):
    """policy_init_adapter: the policy starts from one finished adapter while kl_reference_adapter anchors the KL
    on another; a missing directory is refused naming the field, and the plain-SFT twin (kl_coef 0) ignores it."""
    from steer.models import reference_model

    batch = {
        "input_ids": torch.tensor([[5, 9, 17, 3, 8, 21]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
    }
    logits = {}
    for name, lr in (("ref", 3e-2), ("init", 1e-1)):
        sft = _trainer(tmp_path / name, kl_coef=0.0, max_steps=3, learning_rate=lr, seed=len(name))
        sft.train()
        sft.save_model(str(tmp_path / f"{name}_out"))
        sft.model.eval()
        with torch.no_grad():
            logits[name] = sft.model(**batch).logits
    assert float((logits["ref"] - logits["init"]).abs().max()) > 1e-3

    trainer = _trainer(
        tmp_path / "run",
        kl_reference="base",
        kl_reference_adapter=str(tmp_path / "ref_out"),
        policy_init_adapter=str(tmp_path / "init_out"),
        max_steps=2,
    )
    model = trainer.model.eval()
    with torch.no_grad():
        # the policy runs with init's weights, the reference with ref's
        assert float((model(**batch).logits - logits["init"]).abs().max()) < 1e-5
        with reference_model(model):
            assert float((model(**batch).logits - logits["ref"]).abs().max()) < 1e-5
    trainer.train()
    assert all(math.isfinite(x) for x in _losses(trainer))

    with pytest.raises(Exception, match="policy_init_adapter.*no adapter_config.json"):
        _trainer(tmp_path / "bad", kl_reference="base", policy_init_adapter=str(tmp_path / "nowhere"))
    twin = _trainer(tmp_path / "twin", kl_coef=0.0, policy_init_adapter=str(tmp_path / "nowhere"))
    assert twin.model is not None  # ignored by the plain-SFT twin


@pytest.mark.parametrize(
    ("kl_reference", "stop_at_violation", "context_prior"),
    [
        ("policy", False, "none"),
        ("policy", True, "none"),
        ("base", False, "none"),
        ("base", True, "none"),
        ("policy", True, "corpus"),
    ],
)
def test_fused_kl_matches_chunked(tmp_path, kl_reference, stop_at_violation, context_prior):
    """Loss, logged KL terms, TRL's SFT metrics and policy gradients of the fused path (SFT NLL and KL from one
    head pass) equal the chunked reference's (TRL's SFT loss, then the KL on materialised logits). With
    ``kl_corpus_stop_at_violation`` some supervised positions are NLL-only rows (after the KL rows, no z); with
    the context prior, z carries its offsets (" bad" is " b" + "ad" for the tiny tokenizer) on both paths."""
    results = {}
    for implementation in ("chunked", "fused"):
        trainer = _trainer(
            tmp_path / implementation,
            kl_implementation=implementation,
            kl_reference=kl_reference,
            kl_coef=0.7,
            kl_sample_coef=0.3,
            kl_positions="both",
            kl_corpus_stop_at_violation=stop_at_violation,
            guidance_context_prior=context_prior,
            guidance_prior_cache_dir=str(tmp_path / "priors"),
        )
        assert (trainer.guidance.context_prior is not None and len(trainer.guidance.context_prior) > 0) == (
            context_prior == "corpus"
        )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a guidance model that is far from R = 0.5
            head = trainer.guidance.head
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.3)
            head.bias.copy_(torch.randn(head.bias.shape, generator=gen))
            for name, param in trainer.model.named_parameters():  # a policy away from the base
                if "lora_B" in name and ".default." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        trainer.run_due_rounds()  # policy samples for the sample positions
        assert trainer.schedule.samples
        assert (trainer.constraint_kl.fused_head() is not None) == (implementation == "fused")
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        if stop_at_violation:  # some supervised positions lie after a flagged token: NLL-only rows
            supervised, targets = trainer.constraint_kl.corpus_mask(batch)
            assert (trainer.constraint_kl.corpus_kl_mask(batch, supervised, targets) != supervised).any()
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(37))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        assert trainer._shares_head(batch, False) == (implementation == "fused")  # one head pass for SFT + KL
        keys = (
            "kl",
            "kl_samples",
            "lm_loss",
            "kl_grad_share",
            "kl_grad_cosine",
            "entropy",
            "mean_token_accuracy",
        )
        metrics = {key: trainer._metrics["train"][key][-1] for key in keys}
        results[implementation] = (float(loss.detach()), metrics, grads)
    (loss_c, metrics_c, grads_c), (loss_f, metrics_f, grads_f) = results["chunked"], results["fused"]
    assert metrics_c["kl"] > 1e-3 and metrics_c["kl_samples"] > 1e-3
    assert abs(loss_c - loss_f) < 1e-5
    for key, value in metrics_c.items():
        assert abs(value - metrics_f[key]) < 1e-5, key
    assert grads_c.keys() == grads_f.keys() and grads_c
    for name, grad in grads_c.items():
        torch.testing.assert_close(grads_f[name], grad, atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------- rounds
def test_rounds_happen_at_the_configured_steps(tmp_path):
    trainer = _trainer(tmp_path, guidance_interval=3, max_steps=7)
    seen = []
    on_round = trainer.schedule.on_round

    def spy(round_index):
        seen.append((round_index, trainer.state.global_step))
        return on_round(round_index)

    trainer.schedule.on_round = spy
    trainer.train()
    assert seen == [(0, 0), (1, 3), (2, 6)]
    logs = trainer.state.log_history
    for key in (
        "lm_loss",
        "kl",
        "guidance/loss",
        "constraint/satisfaction",
        "samples_per_second",
        "guidance/staleness",
    ):
        assert any(key in h for h in logs), key
    assert all(h["guidance/staleness"] == 0 for h in logs if "guidance/staleness" in h)


def test_parallel_synchronised_equals_sequential(tmp_path):
    sequential = _trainer(tmp_path / "s", max_steps=5)
    sequential.train()
    parallel = _trainer(tmp_path / "p", max_steps=5, schedule="parallel", parallel_synchronised=True)
    parallel.train()
    a, b = _losses(sequential), _losses(parallel)
    assert len(a) == 5 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    for x, y in zip(sequential.guidance.trainable_parameters(), parallel.guidance.trainable_parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_parallel_schedule_runs_one_round_stale(tmp_path):
    trainer = _trainer(tmp_path, max_steps=6, schedule="parallel", parallel_worker_threads=1)
    versions = []
    on_round = trainer.schedule.on_round

    def spy(round_index):
        out = on_round(round_index)
        versions.append((round_index, trainer.schedule.version))
        return out

    trainer.schedule.on_round = spy
    trainer.train()
    # warm-up round 0 is waited for; round k >= 1 is swapped in at the start of round k+1.
    assert versions == [(0, 0), (1, 0), (2, 1)]
    staleness = [h["guidance/staleness"] for h in trainer.state.log_history if "guidance/staleness" in h]
    assert staleness[:2] == [0, 0] and staleness[2:] == [1, 1, 1, 1]
    assert trainer.schedule.version == 2  # the last round was swapped in when training ended
    # the worker never touched the trained model's adapters
    assert trainer.model.active_adapter == "default"


# --------------------------------------------------------------------------------------------- resume / export
@pytest.mark.parametrize(
    ("schedule", "settings"),
    [
        ("sequential", {}),
        ("parallel", {"parallel_worker_threads": 1}),
        # the shared context logit is a trained part; the suffix weights need the base reference
        (
            "sequential",
            {"kl_reference": "base", "guidance_shared_logit": True, "importance_weighting": "suffix"},
        ),
        # frozen token rows: only the context learns, and the rows and the prior bias resume as they were
        ("sequential", {"guidance_shared_logit": True, "guidance_token_rows": False}),
        # the embedding-tied token term is a trained part too
        (
            "sequential",
            {"guidance_shared_logit": True, "guidance_token_rows": False, "guidance_token_rank": 2},
        ),
    ],
)
def test_resume_matches_an_uninterrupted_run(tmp_path, schedule, settings):
    extra = dict(settings)
    full = _trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, schedule=schedule, **extra)
    full.train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / "guidance" / "model.safetensors").is_file()
    assert (checkpoint / "constrained_state.pt").is_file()
    resumed = _trainer(tmp_path, max_steps=6, save_strategy="no", schedule=schedule, **extra)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = _losses(full), _losses(resumed)  # the resumed history starts with the checkpoint's 3 steps
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    tokens = [[h["num_tokens"] for h in t.state.log_history if "num_tokens" in h] for t in (full, resumed)]
    assert tokens[0] == tokens[1] and tokens[0][-1] > tokens[0][0] > 0  # TRL's token counter resumes too
    for x, y in zip(full.guidance.trainable_parameters(), resumed.guidance.trainable_parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    if settings.get("guidance_shared_logit"):
        assert full.guidance.head.shared is not None and full.guidance.head.shared.abs().sum() > 0
    if settings.get("guidance_token_rows") is False:
        for trainer in (full, resumed):
            assert not trainer.guidance.head.weight.any()
        torch.testing.assert_close(full.guidance.head.bias, resumed.guidance.head.bias, rtol=0, atol=0)


def test_save_model_reloads_with_identical_logits(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.train()
    out = tmp_path / "export"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file()
    assert not (
        out / "guidance" / "adapter_model.safetensors"
    ).exists()  # only the policy adapter at the root
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        expected_z = trainer.guidance(ids)
    base, _ = tiny_causal_lm("llama", seed=0)
    loaded = PeftModel.from_pretrained(base, str(out))
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        guidance = GuidanceModel.from_pretrained(out / "guidance", loaded)
        torch.testing.assert_close(guidance(ids), expected_z, rtol=0, atol=1e-6)


def test_stop_when_satisfied_needs_a_monotone_constraint_and_counts_settled_positions(tmp_path):
    with pytest.raises(UserInputError, match="kl_stop_when_satisfied: the constraint .* is not monotone"):
        _trainer(tmp_path, kl_stop_when_satisfied=True)
    topic = KeywordConstraint(["the", "a", "and", "of", "to"], mode="any_of")  # common words: settled early
    trainer = _trainer(tmp_path, constraint=topic, kl_stop_when_satisfied=True, max_steps=2, logging_steps=1)
    trainer.train()
    shares = [h["kl_settled_share"] for h in trainer.state.log_history if "kl_settled_share" in h]
    assert shares and all(0.0 <= s <= 1.0 for s in shares)


def test_violating_prefix_stop_drops_positions_after_the_oracle_calls_a_prefix_violating(tmp_path):
    ban = KeywordConstraint(banned=["the", "a", "and", "of", "to"])  # common words: violated early
    trainer = _trainer(
        tmp_path,
        constraint=ban,
        kl_stop_at_violating_prefix=True,
        kl_corpus_stop_at_violation=False,
        max_steps=2,
        logging_steps=1,
    )
    trainer.train()
    shares = [h["kl_violated_share"] for h in trainer.state.log_history if "kl_violated_share" in h]
    assert shares and all(0.0 <= s <= 1.0 for s in shares) and max(shares) > 0
