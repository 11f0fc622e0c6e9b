"""recipes/topic/fluency.py: generation perplexity split by the oracle's verdict, and word stuffing."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from steer.models import tiny_causal_lm

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "topic" / "fluency.py"


def _script():
    spec = importlib.util.spec_from_file_location("topic_fluency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stuffing_counts_one_repeated_word():
    fluency = _script()
    assert fluency.stuffed("votes: voting vote vote vote")
    assert not fluency.stuffed("the vote was held on a rainy day in the city")
    assert not fluency.stuffed("")


def test_split_perplexity_pools_back_to_the_whole(tmp_path):
    fluency = _script()
    rows = [
        {"prompt": "the city", "continuations": [" vote vote vote", " a calm day"], "toxicity": [0.0, 1.0]},
        {
            "prompt": "at night",
            "continuations": [" music and books", " the election"],
            "toxicity": [1.0, 0.0],
        },
    ]
    (tmp_path / "run.generations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    result = fluency.analyse(model, tokenizer, fluency.load_run(tmp_path, "run"), n_boot=50, seed=0)
    assert result["n"] == 4 and result["on_topic_share"] == 0.5
    assert result["stuffed"] == 0.25 and result["stuffed_on_topic"] == 0.5
    on, off, whole = result["on_topic"], result["off_topic"], result["all"]
    assert on["n"] == off["n"] == 2
    assert min(on["ppl"], off["ppl"]) <= whole["ppl"] <= max(on["ppl"], off["ppl"])
    assert all(math.isfinite(x) for x in whole["ci95"])
    with pytest.raises(SystemExit, match="no generations file"):
        fluency.load_run(tmp_path, "missing")
