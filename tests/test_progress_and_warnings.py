"""Progress bars of the long phases, no deprecated transformers API from steer's calls, CPU-safe configs,
and the one home of atomic writes (steer.io)."""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

from steer.constraints import KeywordConstraint
from steer.guidance import GuidanceConfig, GuidanceModel, guided_generate, label_samples
from steer.guidance.sampling import score_texts
from steer.io import atomic_save_file, atomic_write, atomic_write_text
from steer.models import tiny_causal_lm
from steer.progress import chunks, progress_bar, progress_disabled
from steer.trainers.schedule import GuidanceLearner, RoundSettings

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The cat", "A dog", "The bird is", "Good and", "It was", "The calm"]


@pytest.fixture
def bars_on(monkeypatch):
    """Progress bars allowed by the environment (the suite turns them off in conftest)."""
    import tqdm.auto

    for name in ("STEER_NO_PROGRESS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)

    class EveryUpdate(tqdm.auto.tqdm):  # draw every update, so that the test sees the final counts
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})

    monkeypatch.setattr(tqdm.auto, "tqdm", EveryUpdate)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    yield
    hf_logging.set_verbosity(verbosity)


def _no_future_warnings():
    """A context in which a FutureWarning fails the test, except PEFT's own read of a deprecated property
    (the one pyproject's pytest filter names: PEFT 0.21 reads ``model.is_gradient_checkpointing`` itself)."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("error", FutureWarning)
    warnings.filterwarnings(
        "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning, "transformers.modeling_utils"
    )
    return context


# ------------------------------------------------------------------------------------------ progress rules
def test_progress_rules_follow_the_environment_and_the_transformers_switches(bars_on, monkeypatch):
    assert progress_disabled() is False
    assert progress_disabled(True) is True
    monkeypatch.setenv("STEER_NO_PROGRESS", "1")
    assert progress_disabled() is True
    assert progress_disabled(False) is False  # an explicit choice (e.g. disable_tqdm=False) wins
    monkeypatch.delenv("STEER_NO_PROGRESS")
    monkeypatch.setenv("TQDM_DISABLE", "true")
    assert progress_disabled() is True
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert progress_disabled() is False
    hf_logging.disable_progress_bar()
    assert progress_disabled() is True
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_error()  # like TrainingArguments' disable_tqdm default (log level above WARNING)
    assert progress_disabled() is True


def test_chunks_cover_the_items_and_the_bar_counts_items(bars_on, capsys):
    items = list(range(10))
    assert [list(c) for c in chunks(items, 4, desc="counting")] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    err = capsys.readouterr().err
    assert "counting" in err and "10/10" in err
    with pytest.raises(ValueError, match="chunk size"):
        list(chunks(items, 0))
    with progress_bar(range(3), desc="hidden", disable=True) as bar:
        assert list(bar) == [0, 1, 2]
    assert "hidden" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a guidance round
def _round_learner(disable_tqdm):
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    guidance.set_trainable(False)
    settings = RoundSettings(
        samples_per_round=8,
        sample_max_new_tokens=4,
        sample_batch_size=4,
        guidance_steps_per_round=3,
        guidance_batch_size=4,
    )
    return GuidanceLearner(
        policy,
        guidance,
        tokenizer,
        lambda texts: [float(len(t) % 2) for t in texts],  # both labels, whatever the random model says
        PROMPTS,
        settings,
        lr=1e-2,
        seed=0,
        disable_tqdm=disable_tqdm,
    )


def test_a_guidance_round_shows_sampling_labelling_and_step_progress(bars_on, capsys, caplog):
    learner = _round_learner(disable_tqdm=None)
    capsys.readouterr()
    with caplog.at_level("INFO", logger="steer.trainers.schedule"):
        learner.run_round(0)
    err = capsys.readouterr().err
    assert "guidance round 0: sampling" in err and "8/8" in err
    assert "guidance round 0: labelling" in err
    assert "guidance round 0: guidance steps" in err and "3/3" in err and "loss=" in err
    summary = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(summary) == 1 and "samples" in summary[0] and "guidance steps" in summary[0]


def test_disable_tqdm_silences_the_round(bars_on, capsys):
    learner = _round_learner(disable_tqdm=True)
    capsys.readouterr()
    learner.run_round(0)
    assert "guidance round" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ scoring
def test_chunked_scoring_matches_one_call_and_masks_failures():
    texts = [f"text {i} the" if i % 3 else f"text {i}" for i in range(10)]
    constraint = KeywordConstraint(banned=["the"])
    whole = constraint.evaluate(texts)
    chunked = score_texts(constraint, texts, batch_size=3)
    assert torch.equal(whole.probs, chunked.probs) and torch.equal(whole.valid, chunked.valid)

    def bare(batch):  # a plain callable: NaN and out-of-range scores are failures
        return [float("nan") if "1" in t else (2.0 if "2" in t else 0.5) for t in batch]

    scores = score_texts(bare, texts, batch_size=4)
    assert scores.valid.tolist() == ["1" not in t and "2" not in t for t in texts]
    assert score_texts(bare, [], batch_size=4).probs.numel() == 0
    with pytest.raises(RuntimeError, match="returned 1 scores for 2 texts"):
        score_texts(lambda batch: [0.5], ["a", "b"])


def test_label_samples_keeps_its_labels_when_chunked(tiny_llama):
    from steer.guidance import sample_continuations

    model, tokenizer = tiny_llama
    batch = sample_continuations(model, tokenizer, PROMPTS, max_new_tokens=4, seed=0, disable_tqdm=True)
    constraint = KeywordConstraint(banned=["the"])
    a = label_samples(batch, constraint, batch_size=2, disable_tqdm=True)
    b = label_samples(batch, constraint, batch_size=64, disable_tqdm=True)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores)


def test_toxicity_scoring_and_perplexity_show_progress(bars_on, capsys, tiny_llama):
    from steer.eval.metrics import perplexity, toxicity_scores

    model, tokenizer = tiny_llama
    scores = toxicity_scores([["a the", "b"], ["c"]], KeywordConstraint(banned=["the"]))
    assert [len(row) for row in scores] == [2, 1] and scores[0][0] == 1.0 and scores[0][1] == 0.0
    assert "scoring toxicity" in capsys.readouterr().err
    value = perplexity(model, tokenizer, ["a b c", "d e"], batch_size=1)
    assert np.isfinite(value)
    assert "perplexity" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ persona phases
def test_embedder_fit_and_cohort_search_show_progress(bars_on, capsys, caplog):
    from steer.persona.cohorts import find_cohorts
    from steer.persona.embedder import PersonaEmbedder
    from steer.persona.simulate import synthetic_responses

    responses = synthetic_responses(60, 20, dim=2, observed_frac=0.5, seed=0)
    with caplog.at_level("INFO", logger="steer.persona.embedder"):
        embedder = PersonaEmbedder(2, method="als", max_iters=5).fit(responses)
    err = capsys.readouterr().err
    assert "embedder fit (als)" in err and "train_rmse=" in err
    assert any(
        r.getMessage().startswith("embedder fit (als): 60 users x 20 questions") for r in caplog.records
    )
    PersonaEmbedder(2, method="adam", epochs=2).fit(responses, disable_tqdm=True)
    assert "embedder fit" not in capsys.readouterr().err
    result = find_cohorts(embedder.embeddings, k_range=range(2, 5))
    assert result.k in (2, 3, 4)
    assert "cohort search" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ deprecations
def test_kv_cached_paths_use_the_cache_api_without_future_warnings(tiny_llama):
    from steer.persona.soft_prompt import SoftPromptNetwork, steered_forward
    from steer.persona.steering import decode

    model, tokenizer = tiny_llama
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.ones_like(ids)
    context = _no_future_warnings()
    try:
        network = SoftPromptNetwork(3, 2, "prefix", hidden=8, model_config=model.config)
        out = steered_forward(model, network, torch.zeros(1, 3), ids, mask, use_cache=True)
        assert isinstance(out.cache, DynamicCache)
        tokens = decode(model, ids, mask, max_new_tokens=3, network=network, persona=torch.zeros(1, 3))
        assert tokens.shape == (2, 3)
        policy = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
        guidance = GuidanceModel(policy, GuidanceConfig(lora_r=2))
        cache = DynamicCache()
        step = guidance(ids, mask, cache=cache)[:, -1]
        torch.testing.assert_close(step, guidance(ids, mask)[:, -1])
        texts = guided_generate(policy, guidance, tokenizer, ["The cat"], max_new_tokens=3, seed=0)
        assert len(texts) == 1
    finally:
        context.__exit__(None, None, None)


def test_configs_are_cpu_safe_and_quiet(tmp_path):
    """The README's example config works as written on a CPU-only machine, without FutureWarnings."""
    from steer.trainers.constrained import ConstrainedConfig
    from steer.trainers.persona import PersonaConfig

    context = _no_future_warnings()
    try:
        readme = ConstrainedConfig(
            output_dir=str(tmp_path / "detox"), kl_coef=0.5, guidance_interval=20, schedule="parallel"
        )
        persona = PersonaConfig(output_dir=str(tmp_path / "persona"))
    finally:
        context.__exit__(None, None, None)
    if not torch.cuda.is_available():
        assert readme.bf16 is False and persona.bf16 is False
    assert readme.activation_checkpointing is True  # TRL's default, under its current name
    assert (
        ConstrainedConfig(output_dir=str(tmp_path), bf16=False, activation_checkpointing=False).bf16 is False
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16"):  # an explicit request still gets transformers' error
            ConstrainedConfig(output_dir=str(tmp_path), bf16=True)


def test_the_readme_example_trains_on_cpu(tmp_path):
    """README's Python example (kl_coef, guidance_interval, schedule='parallel'), shortened to two steps."""
    from datasets import Dataset

    from steer.trainers.constrained import ConstrainedConfig, ConstrainedTrainer

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    corpus = Dataset.from_dict({"text": ["The cat sat.", "A dog ran.", "It was calm.", "Good day."] * 2})
    prompts = Dataset.from_dict({"prompt": PROMPTS})
    args = ConstrainedConfig(
        output_dir=str(tmp_path / "detox"),
        kl_coef=0.5,
        guidance_interval=20,
        schedule="parallel",
        # shortened for a test: everything above is the README's, the rest keeps the run tiny
        max_steps=2,
        per_device_train_batch_size=4,
        samples_per_round=4,
        sample_max_new_tokens=4,
        guidance_steps_per_round=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = ConstrainedTrainer(
        model=model,
        args=args,
        train_dataset=corpus,
        prompt_dataset=prompts,
        constraint=KeywordConstraint(banned=["the"]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "detox"))
    assert (tmp_path / "detox" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "detox" / "guidance" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ steer.io
def test_atomic_writes_use_the_normal_mode_and_leave_nothing_behind(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    def fail(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "hello"  # the old content survives
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]  # no temporary file left

    from safetensors.torch import load_file

    weight = torch.arange(6.0).view(2, 3).t().requires_grad_(True)  # non-contiguous, with grad
    atomic_save_file({"w": weight}, tmp_path / "w.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(load_file(str(tmp_path / "w.safetensors"))["w"], weight.detach())


def test_no_private_atomic_helpers_outside_steer_io():
    import steer.eval.report as report
    import steer.persona.soft_prompt as soft_prompt

    assert not hasattr(soft_prompt, "_atomic_write_text")
    assert not hasattr(report, "tempfile")
    assert soft_prompt.atomic_save_file is atomic_save_file  # imported from steer.io, not redefined


@pytest.mark.parametrize("disable, expected", [(False, None), (True, True)])
def test_guidance_round_bars_follow_the_environment_unless_disabled(tmp_path, disable, expected):
    """TrainingArguments turns an unset disable_tqdm into False; the guidance rounds get None then, so that
    STEER_NO_PROGRESS / TQDM_DISABLE decide (steer.progress.progress_disabled)."""
    from helpers.constrained import trainer

    assert trainer(tmp_path, disable_tqdm=disable).schedule.learner.disable_tqdm is expected
