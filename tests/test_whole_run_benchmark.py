"""``benchmarks/whole_run.py``: its arguments, the result it assembles, and a whole tiny run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers.launch import tiny_corpus_file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import whole_run  # noqa: E402


def _run(wall, rounds, steps_s, rss=100.0) -> dict:
    per_round = [{"step": 25 * i, "round_s": r} for i, r in enumerate(rounds)]
    return {
        "wall_s": wall,
        "train_s": steps_s + sum(rounds),
        "steps_s": steps_s,
        "peak_rss_mb": rss,
    }, per_round


def test_arguments_default_to_the_shortened_recipe_and_pass_the_rest_on():
    args, extra = whole_run.parse_args(["--threads", "2", "--", "--dataset_name", "x.jsonl"])
    assert (args.full, args.max_steps, args.threads, args.child) == (False, None, 2, None)
    assert extra == ["--dataset_name", "x.jsonl"]
    with pytest.raises(SystemExit):
        whole_run.parse_args(["--full", "--max-steps", "10"])
    assert whole_run.rounds_in(30, 25) == 2 and whole_run.rounds_in(150, 25) == 6


def test_the_result_holds_ratios_the_samples_term_and_a_projection():
    runs = {}
    for name, (wall, rounds, steps_s, rss) in {
        "constrained": (300.0, [100.0, 30.0], 150.0, 900.0),
        "sft": (120.0, [], 100.0, 600.0),
        "corpus": (280.0, [100.0, 30.0], 130.0, 880.0),
    }.items():
        run, per_round = _run(wall, rounds, steps_s, rss)
        runs[name] = {**run, "per_round": per_round}
    meta = {"max_steps": 30, "recipe_max_steps": 150, "guidance_interval": 25}
    result = whole_run.assemble(runs, meta)
    ratios = result["constrained_over_sft"]
    assert ratios["wall"] == pytest.approx(2.5) and ratios["steps_without_rounds"] == pytest.approx(1.5)
    assert ratios["peak_rss"] == pytest.approx(1.5)
    assert result["samples_term_s"] == pytest.approx(20.0)
    projected = result["projected_to_recipe_steps"]
    assert projected["constrained"]["rounds_s"] == pytest.approx(100.0 + 5 * 30.0)  # warm-up + 5 rounds
    assert projected["constrained"]["steps_s"] == pytest.approx(750.0)
    assert projected["sft"]["train_s"] == pytest.approx(500.0)
    del runs["corpus"]
    assert whole_run.assemble(runs, meta)["samples_term_s"] is None


def test_a_tiny_recipe_end_to_end(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    corpus = tiny_corpus_file(tmp_path / "corpus.jsonl")
    argv = ["--config", str(ROOT / "recipes" / "tiny" / "constrained.yaml"), "--model", str(tiny_model_dir)]
    argv += ["--max-steps", "3", "--output-dir", str(tmp_path / "results"), "--name", "tiny_whole_run"]
    argv += ["--", "--dataset_name", str(corpus), "--constraint", "keyword"]
    argv += [
        "--constraint_kwargs",
        json.dumps({"banned": ["the", "a", "is", "bad"]}),
        "--disable_tqdm",
        "true",
    ]
    whole_run.main(argv)
    result = json.loads((tmp_path / "results" / "tiny_whole_run.json").read_text())
    assert result["max_steps"] == 3 and result["recipe_max_steps"] == 4 and result["shortened"]
    assert set(result["runs"]) == {
        "constrained",
        "sft",
        "corpus",
    }  # the tiny recipe appends samples (default)
    c, s = result["runs"]["constrained"], result["runs"]["sft"]
    assert c["rounds"]["count"] == 2 and s["rounds"]["count"] == 0  # rounds before steps 1 and 3
    assert c["sample_rows"] > 0 and result["runs"]["corpus"]["sample_rows"] == 0
    for run in result["runs"].values():
        assert run["threads"] == 1 and run["global_step"] == 3 and run["peak_rss_mb"] > 0
        assert 0 <= run["rounds_s"] <= run["train_s"] <= run["wall_s"]
        assert run["setup_s"] > 0 and run["steps_s"] > 0
        assert all(run["rounds"][f"{phase}_s"] >= 0 for phase in whole_run.ROUND_PHASES)
    assert result["constrained_over_sft"]["wall"] > 0 and isinstance(result["samples_term_s"], float)
    assert result["commit"] and result["date"] and len(result["load_before"]) == 3
