"""Opinion evaluation: ordinal Wasserstein / representativeness, macro accuracy, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from steer.eval.opinion_baselines import demographic_preamble, few_shot_preamble
from steer.eval.opinion_individuals import INDIVIDUAL_METHODS
from steer.eval.opinion_metrics import (
    direction_agreement,
    macro_accuracy,
    ordinal_wasserstein,
    representativeness,
)
from steer.eval.opinions import METHODS, OpinionEvalArguments, run_opinion_eval

ROOT = Path(__file__).resolve().parent.parent


def _has_opinionqa() -> bool:
    try:
        from steer.data import opinionqa_dir

        return (opinionqa_dir() / "American_Trends_Panel_W26" / "info.csv").is_file()
    except FileNotFoundError:
        return False


def test_ordinal_wasserstein_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        support = np.sort(rng.random(n))
        p, q = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(n))
        expected = wasserstein_distance(support, support, p, q)
        assert ordinal_wasserstein(p, q, support) == pytest.approx(expected, abs=1e-12)


def test_representativeness_edge_cases():
    support = [0.0, 0.5, 1.0]
    assert representativeness([1, 0, 0], [0, 0, 1], support) == pytest.approx(0.0)
    assert representativeness([0.2, 0.3, 0.5], [0.2, 0.3, 0.5], support) == pytest.approx(1.0)
    assert representativeness([1, 0, 0], [0, 1, 0], support) == pytest.approx(0.5)
    # normalised by the span of the ordinal scale: same answer on a 1..5 scale
    assert representativeness([1, 0, 0], [0, 1, 0], [1.0, 3.0, 5.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="nominal"):
        representativeness([0.5, 0.5], [0.5, 0.5], [1.0, 1.0])
    with pytest.raises(ValueError, match="probability distribution"):
        ordinal_wasserstein([0.5, 0.6], [0.5, 0.5], [0.0, 1.0])
    with pytest.raises(ValueError, match="sorted"):
        ordinal_wasserstein([0.5, 0.5], [0.5, 0.5], [1.0, 0.0])


def test_macro_accuracy_weights_people_equally():
    correct = {"a": [True, False], "b": [True], "c": []}
    assert macro_accuracy(correct) == pytest.approx(0.75)  # micro would be 2/3


def test_direction_constant_sign_is_the_training_majority():
    """The `constant` direction baseline guesses the training questions' majority sign everywhere."""

    class Q:
        scaled = (0.0, 1.0)

    low, high = np.array([0.8, 0.2]), np.array([0.2, 0.8])
    train = ["t1", "t2", "t3"]  # g below h on two of three training questions
    scored = ["e1", "e2", "e3", "e4"]  # g below h on three of four scored questions
    below = {"t1", "t2", "e1", "e2", "e3"}
    real = {}
    for k in train + scored:
        real[("g", k)], real[("h", k)] = (low, high) if k in below else (high, low)
    questions = {k: Q() for k in train + scored}
    outputs = {"steered": {("g", k): high for k in scored} | {("h", k): low for k in scored}}
    result = direction_agreement(
        outputs, real, questions, ["g", "h"], scored, n_boot=50, seed=0, train_keys=train
    )
    methods = result["g - h"]["methods"]
    assert methods["constant"]["sign"] == -1.0
    assert methods["constant"]["sign_right"]["mean"] == pytest.approx(0.75)
    assert methods["steered"]["sign_right"]["mean"] == pytest.approx(0.25)
    assert (
        "constant"
        not in direction_agreement(outputs, real, questions, ["g", "h"], scored, n_boot=50, seed=0)["g - h"][
            "methods"
        ]
    )


def test_baseline_prompts():
    text = demographic_preamble({"POLPARTY": "Democrat", "RACE": "White"})
    assert "political party: Democrat" in text and "race: White" in text
    shots = few_shot_preamble([("Is it safe?", "Very safe"), ("Do you vote?", "Yes")])
    assert shots.count("Q: ") == 2 and "A: Very safe" in shots


def test_bad_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown \\['magic'\\]"):
        OpinionEvalArguments(persona_dir="x", methods=["magic"])
    with pytest.raises(FileNotFoundError, match="persona_dir"):
        run_opinion_eval(OpinionEvalArguments(persona_dir="/nonexistent/persona"))


def test_split_parts_score_their_own_questions():
    from steer.eval.opinion_groups import eval_question_keys

    split = {
        "train_question_keys": ["A_W26"],
        "valid_question_keys": ["B_W43"],
        "eval_question_keys": ["C_W49"],
    }
    assert [eval_question_keys(split, part) for part in ("train", "valid", "eval")] == [
        ["A_W26"],
        ["B_W43"],
        ["C_W49"],
    ]
    with pytest.raises(ValueError, match="no valid questions"):
        eval_question_keys({"eval_question_keys": ["C_W49"]}, "valid")
    with pytest.raises(ValueError, match="split must be 'eval', 'within', 'valid' or 'train'"):
        OpinionEvalArguments(persona_dir="x", split="test")


@pytest.mark.parametrize("name", ["config.yaml", "config_full.yaml"])
def test_recipe_configs_parse(name):
    from steer.cli import COMMANDS, parse_command_args

    command = next(c for c in COMMANDS if c.words == ("train", "persona"))
    script_args, training_args = parse_command_args(
        command, ["--config", str(ROOT / "recipes" / "persona_opinionqa" / name), "--output_dir", "/tmp/x"]
    )
    assert script_args.model_name_or_path == "smollm2-135m"
    assert training_args.soft_prompt_mode == "prefix"


@pytest.mark.skipif(not _has_opinionqa(), reason="OpinionQA data not available")
def test_tiny_recipe_end_to_end(tmp_path):
    """Individuals: simulate -> whole-question split -> embed -> cohorts -> train (tiny model) -> evaluate
    every method on held-out questions only -> report."""
    from steer.models import tiny_causal_lm
    from steer.persona.steering import PersonaSteeredModel
    from steer.scripts.persona import PersonaConfig, PersonaScriptArguments, train_persona

    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    script = PersonaScriptArguments(
        model_name_or_path=str(tmp_path / "tiny"),
        persona_source="individuals",
        waves=[26],
        n_respondents=40,
        observed_frac=0.6,
        max_questions=10,
        embedding_dim=4,
        num_cohorts=3,
        eval_users=8,
        max_eval_examples=16,
        max_train_examples=48,
    )
    config = PersonaConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        bf16=False,
        max_steps=3,
        per_device_train_batch_size=8,
        num_virtual_tokens=2,
        soft_prompt_hidden=8,
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=3,
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = train_persona(script, config)
    assert trainer.state.global_step == 3
    split = json.loads((tmp_path / "run" / "data" / "split.json").read_text())
    train_keys, valid_keys, eval_keys = (
        set(split[f"{part}_question_keys"]) for part in ("train", "valid", "eval")
    )
    assert eval_keys and not (eval_keys & train_keys) and not (valid_keys & (train_keys | eval_keys))
    persona_dir = tmp_path / "run" / "persona"
    index = json.loads((persona_dir / "personas.json").read_text())
    assert index["cohorts"]["k"] == 3 and len(index["cohort_of_user"]) <= 40
    assert any(name.startswith("POLPARTY=") for name in index["names"])
    steered = PersonaSteeredModel.from_pretrained(str(tmp_path / "tiny"), persona_dir)
    assert set(steered.embedder.question_keys) == train_keys  # the MF never saw a held-out question
    assert steered.option_probs("Is it safe?", ["Yes", "No"], persona="cohort:1").shape == (2,)

    args = OpinionEvalArguments(
        persona_dir=str(persona_dir),
        output_dir=str(tmp_path / "eval"),
        methods=list(METHODS),
        max_users=4,
        max_answers_per_user=2,
        max_questions=4,
        batch_size=8,
        n_bootstrap=100,
    )
    result = run_opinion_eval(args)
    for method in INDIVIDUAL_METHODS:
        assert 0.0 <= result["metrics"][f"accuracy_macro/{method}"] <= 1.0, method
    for method in ("steered", "raw", "demographic", "few_shot", "zero", "shuffled", "population"):
        assert 0.0 <= result["metrics"][f"representativeness/{method}"] <= 1.0, method
    groups = result["groups"]
    assert set(groups["question_keys"]) <= eval_keys
    assert set(groups["methods"]["steered"]["per_group"]) <= set(groups["groups"])
    assert result["individuals"]["num_people"] == 4
    for name in ("opinions.json", "opinions.md", "opinions.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "eval" / "opinions.json").read_text())
    assert saved["metrics"] == pytest.approx(result["metrics"])
    assert "representativeness/train_frequency" not in result["metrics"]  # no question repeats: undefined
