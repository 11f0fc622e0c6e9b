"""`steer train oracle`: a toxicity classifier trained on Perspective-labelled RTP records, saved as an ordinary
sequence-classifier directory that ClassifierConstraint and `steer eval toxicity --oracle classifier` load."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from steer.cli import COMMANDS, main, parse_command_args
from steer.errors import UserInputError
from steer.eval.agreement import auc_with_interval
from steer.scripts.oracle import (
    LABELS,
    ORACLE_FILE,
    OracleScriptArguments,
    OracleTrainingArguments,
    oracle_split,
    train_oracle,
)

_CLEAN = "the good cat sees a calm river".split()
_RUDE = "rude dirty bad loud".split()


def _records(n: int, seed: int = 0) -> list[dict]:
    """RTP-shaped records: texts with 'rude'-type words are toxic (Perspective score >= 0.5)."""
    rng = random.Random(seed)

    def part(toxic: bool) -> dict:
        words = rng.sample(_CLEAN, 4) + (rng.sample(_RUDE, 2) if toxic else [])
        rng.shuffle(words)
        score = rng.uniform(0.6, 0.95) if toxic else rng.uniform(0.02, 0.3)
        return {"text": " ".join(words), "toxicity": score, "insult": score / 2}

    return [
        {"prompt": part(i % 3 == 0), "continuation": part(i % 2 == 0), "challenging": False} for i in range(n)
    ]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers.models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _args(tmp_path: Path, data: Path, model: Path, **overrides) -> tuple:
    script = {
        "model_name_or_path": str(model),
        "dataset_name": str(data),
        "heldout_size": 10,
        "validation_size": 8,
        "max_length": 16,
        "lora_r": 2,
        "lora_alpha": 4,
        "bootstrap_samples": 50,
        **{k: v for k, v in overrides.items() if k in OracleScriptArguments.__dataclass_fields__},
    }
    training = {
        "output_dir": str(tmp_path / "oracle"),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "disable_tqdm": True,
        **{k: v for k, v in overrides.items() if k not in OracleScriptArguments.__dataclass_fields__},
    }
    return OracleScriptArguments(**script), OracleTrainingArguments(**training)


def test_oracle_round_trips_through_classifier_constraint(tmp_path, tiny_dir, one_thread, caplog):
    from transformers import AutoModelForSequenceClassification

    from steer.constraints import ClassifierConstraint
    from steer.eval.oracle import OracleArguments, build_oracle

    data = _write(tmp_path / "rtp.jsonl", _records(40))
    script_args, training_args = _args(tmp_path, data, tiny_dir)
    record = train_oracle(script_args, training_args)
    out = Path(training_args.output_dir)

    saved = json.loads((out / ORACLE_FILE).read_text())
    assert saved == record
    assert saved["split"]["heldout"]["records"] == 10 and saved["split"]["validation"]["records"] == 8
    assert saved["split"]["train"]["records"] == 22 and saved["split"]["train"]["texts"] == 44
    assert saved["steps"] == 3 and [h["step"] for h in saved["validation_history"]] == [2, 3]
    heldout = saved["metrics"]["heldout"]
    assert 0.0 <= heldout["auc"] <= 1.0 and heldout["texts"] == 20
    low, high = heldout["auc_ci95"]
    assert low <= high
    assert 0.0 <= saved["metrics"]["heldout_profanity"]["auc"] <= 1.0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not (out / "adapter_config.json").exists()  # the adapter is merged: an ordinary classifier
    assert not list(tmp_path.glob(".oracle.*"))  # no temporary directory left beside it

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.pad_token_id is not None

    texts = ["the good cat sees a calm river", "rude dirty bad loud cat", ""]
    constraint = ClassifierConstraint(str(out), positive_label="non_toxic")
    satisfied = constraint.score(texts)
    assert satisfied.shape == (3,) and np.all((satisfied >= 0) & (satisfied <= 1))
    toxic = ClassifierConstraint(str(out), positive_label="toxic").score(texts)
    np.testing.assert_allclose(satisfied, 1.0 - toxic, atol=1e-6)  # P(satisfied) = P(non_toxic)
    # the held-out AUC in oracle.json is what the saved directory scores
    split = oracle_split(script_args)
    tox = 1.0 - constraint.score(split["heldout"].texts)
    again = auc_with_interval(split["heldout"].labels, tox, split["heldout"].record, n_boot=0)
    assert again["auc"] == pytest.approx(heldout["auc"], abs=1e-6)

    # `steer eval toxicity --oracle classifier --oracle_checkpoint DIR --oracle_label toxic` scores toxicity alike
    oracle = build_oracle(
        OracleArguments(oracle="classifier", oracle_checkpoint=str(out), oracle_label="toxic")
    )
    np.testing.assert_allclose(oracle.score(texts), satisfied, atol=1e-6)

    # the same settings again: the finished oracle is kept (no training)
    before = (out / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="steer.scripts.oracle"):
        assert train_oracle(*_args(tmp_path, data, tiny_dir)) == record
    assert "already holds a finished oracle" in caplog.text
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    # other settings: refused, naming the difference and the way out
    with pytest.raises(UserInputError, match=r"other settings \(learning_rate.*overwrite_output_dir"):
        train_oracle(*_args(tmp_path, data, tiny_dir, learning_rate=5e-3))


def test_split_keeps_the_heldout_tail_and_skips_unscored_texts(tmp_path):
    records = _records(30)
    records[3]["prompt"]["toxicity"] = None  # Perspective failed on this text: skipped, counted
    data = _write(tmp_path / "rtp.jsonl", records)
    script_args = OracleScriptArguments(
        dataset_name=str(data), heldout_size=10, validation_size=5, split_seed=1
    )
    split = oracle_split(script_args)
    assert set(split["heldout"].record) == set(range(20, 30))
    assert not set(split["train"].record) & set(split["validation"].record)
    assert set(split["train"].record) | set(split["validation"].record) == set(range(20))
    assert sum(p.num_unlabelled for p in split.values()) == 1
    assert split["heldout"].labels == [
        int(r[f]["toxicity"] >= 0.5) for r in records[20:] for f in ("prompt", "continuation")
    ]
    only_prompts = oracle_split(
        OracleScriptArguments(
            dataset_name=str(data), heldout_size=10, validation_size=5, text_fields=["prompt"]
        )
    )
    assert len(only_prompts["heldout"].texts) == 10


def test_auc_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = labels + rng.normal(0, 1.0, 200)
    result = auc_with_interval(
        labels, scores, np.arange(200) // 2, n_boot=200, other_scores=rng.normal(size=200)
    )
    low, high = result["auc_ci95"]
    assert low < result["auc"] < high and result["auc"] > 0.6
    assert result["auc_difference"] == pytest.approx(result["auc"] - result["other_auc"])


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_file", r"dataset_name=.*file not found"),
        ("no_scores", r"attribute='toxicity': no prompt/continuation text .* has that Perspective score"),
        ("bad_score", r"RTP record 2 prompt: toxicity='high' is not a Perspective score"),
        ("one_class", r"every train text .* is non-toxic"),
        ("no_text", r"has no 'prompt'"),
    ],
)
def test_bad_data_is_one_clear_line(tmp_path, case, match):
    records = _records(30)
    if case == "no_scores":
        for r in records:
            for part in ("prompt", "continuation"):
                r[part] = {"text": r[part]["text"]}
    elif case == "bad_score":
        for r in records:
            r["prompt"]["toxicity"] = str(r["prompt"]["toxicity"])
        records[2]["prompt"]["toxicity"] = "high"
        for i, r in enumerate(records):
            if i != 2:
                r["prompt"]["toxicity"] = None
    elif case == "one_class":
        for r in records:
            for part in ("prompt", "continuation"):
                r[part]["toxicity"] = 0.1
    elif case == "no_text":
        del records[4]["prompt"]
    data = tmp_path / "rtp.jsonl"
    if case != "missing_file":
        _write(data, records)
    with pytest.raises(UserInputError, match=match) as info:
        oracle_split(OracleScriptArguments(dataset_name=str(data), heldout_size=10, validation_size=5))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--validation_size", "-1", "OracleScriptArguments.validation_size must be >= 0"),
        ("--text_fields", "title", "OracleScriptArguments.text_fields must name prompt and/or continuation"),
        ("--label_threshold", "0", r"OracleScriptArguments.label_threshold must be in \(0, 1\]"),
        ("--lora_dropout", "1.5", r"OracleScriptArguments.lora_dropout must be in \[0, 1\)"),
    ],
)
def test_bad_setting_is_one_line_naming_the_field(flag, value, match, capsys):
    assert main(["train", "oracle", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("steer train oracle: error:") and "\n" not in err
    assert pytest.importorskip("re").search(match, err)


def test_cli_command_and_recipe(tmp_path, capsys):
    command = next(c for c in COMMANDS if c.name == "train oracle")
    root = Path(__file__).resolve().parents[1]
    script_args, training_args = parse_command_args(
        command,
        ["--config", str(root / "recipes/toxicity_oracle/config.yaml"), "--output_dir", str(tmp_path)],
    )
    assert script_args.dataset_name == "rtp" and script_args.heldout_size == 400
    assert training_args.output_dir == str(tmp_path) and training_args.use_cpu == (
        not torch.cuda.is_available()
    )
    assert main(["train", "oracle", "--help"]) == 0
    assert "--validation_size" in capsys.readouterr().out
    # an output_dir holding something else is refused before any model loads
    (tmp_path / "notes.txt").write_text("x")
    data = _write(tmp_path / "rtp.jsonl", _records(30))
    argv = ["--dataset_name", str(data), "--heldout_size", "10", "--validation_size", "5"]
    assert main(["train", "oracle", *argv, "--output_dir", str(tmp_path)]) == 2
    assert "holds other files (notes.txt, rtp.jsonl) but no finished oracle" in capsys.readouterr().err
