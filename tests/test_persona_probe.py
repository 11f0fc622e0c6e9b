"""The linear probe of recipes/persona_opinionqa/probe.py: its ridge/correlation parts and one tiny run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from steer.models import tiny_causal_lm

PROBE = Path(__file__).resolve().parents[1] / "recipes" / "persona_opinionqa" / "probe.py"


def _probe():
    spec = importlib.util.spec_from_file_location("persona_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ridge_recovers_a_planted_direction_and_not_noise():
    probe = _probe()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 20))
    direction = rng.standard_normal(20)
    y = x @ direction + 0.5 * rng.standard_normal(300)
    w, b = probe._ridge(x[:200], y[:200], alpha=1.0)
    assert probe._pearson(x[200:] @ w + b, y[200:]) > 0.95
    noise = rng.standard_normal(300)
    w, b = probe._ridge(x[:200], noise[:200], alpha=1.0)
    low, high = probe._pearson_ci(x[200:] @ w + b, noise[200:])
    assert low < 0 < high


def test_tiny_run_writes_the_report(tmp_path):
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    report = _probe().main(
        [
            "--model", str(tmp_path / "tiny"),
            "--train_waves", "26", "27",
            "--valid_waves", "29",
            "--eval_waves", "32",
            "--layers", "1", "2",
            "--alphas", "1", "100",
            "--output_dir", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["results"].keys() == report["results"].keys()
    assert set(saved["results"]) == {
        "population",
        "POLPARTY=Democrat - POLPARTY=Republican",
        "POLIDEOLOGY=Very liberal - POLIDEOLOGY=Very conservative",
    }
    for entry in saved["results"].values():
        assert entry["layer"] in (1, 2) and entry["alpha"] in (1.0, 100.0)
        assert -1 <= entry["eval_r"] <= 1 and entry["n_eval_questions"] == saved["n_questions"]["eval"] > 0
        low, high = entry["eval_r_ci95"]
        assert low <= high


def test_mean_pooling_averages_the_prompt_tokens_only():
    """``--pool mean``: the average over each prompt's own tokens, padding excluded (left padding)."""
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    probe = _probe()
    prompts = ["a b c d e f", "a b"]
    pooled = probe._features(model, tokenizer, prompts, [0, 1], batch=2, pool="mean")
    for i, prompt in enumerate(prompts):
        single = probe._features(model, tokenizer, [prompt], [0, 1], batch=1, pool="mean")
        for layer in (0, 1):
            np.testing.assert_allclose(pooled[layer][i], single[layer][0], atol=1e-5)
    last = probe._features(model, tokenizer, prompts, [1], batch=2)
    assert not np.allclose(last[1], pooled[1])
