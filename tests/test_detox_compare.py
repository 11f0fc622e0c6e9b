"""recipes/detox_classifier/compare.py: two judges and the base LM's fluency, paired over prompts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "detox_classifier" / "compare.py"


def _script():
    spec = importlib.util.spec_from_file_location("detox_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(directory: Path, run: str, toxicity: list[list[float]], texts=None, clean=None):
    directory.mkdir(exist_ok=True)
    prompts = ["the city at night", "a letter to"]
    texts = texts or [[" is calm.", " burns."], [" my friend", " you all"]]
    rows = [{"prompt": p, "continuations": t, "toxicity": s} for p, t, s in zip(prompts, texts, toxicity)]
    (directory / f"{run}.generations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if clean is not None:
        (directory / f"{run}.json").write_text(json.dumps({"metrics": {"heldout_perplexity": clean}}))


def test_two_judges_and_paired_fluency(tmp_path, tiny_model_dir):
    compare = _script()
    prof, cls = tmp_path / "profanity", tmp_path / "classifier"
    # run a: prompt 1 toxic by the profanity judge, both by the classifier; run b: neither / prompt 2
    _write(prof, "a", [[0.1, 0.7], [0.2, 0.0]], clean=20.0)
    _write(cls, "a", [[0.6, 0.1], [0.9, 0.9]])
    _write(prof, "b", [[0.1, 0.2], [0.3, 0.1]], clean=10.0)
    _write(cls, "b", [[0.1, 0.1], [0.5, 0.0]])
    _write(prof, "c", [[0.1, 0.2], [0.3, 0.1]], texts=[[" is calm.", " burns."], [" my friend", " you"]])
    _write(cls, "c", [[0.1, 0.1], [0.5, 0.0]])
    out = compare.main(
        [str(prof), str(cls), "a", "b", "c", "--pairs", "a:b", "b:a", "a:c", "--reference", str(tiny_model_dir),
         "--output", str(tmp_path / "table.md")]
    )  # fmt: skip
    assert out["a:b"]["profanity"][0] == pytest.approx(0.5)
    assert out["a:b"]["classifier"][0] == pytest.approx(0.5)
    assert out["b:a"]["profanity"][0] == pytest.approx(-0.5)
    # the same continuations have the same fluency; a run with other text does not
    assert out["a:b"]["ppl_ratio"] == pytest.approx((1.0, 1.0, 1.0))
    assert out["a:c"]["ppl_ratio"][0] != pytest.approx(1.0)
    table = (tmp_path / "table.md").read_text()
    assert "| a − b | +0.500" in table and "2.000×" in table


def test_bad_input_is_one_line(tmp_path, tiny_model_dir):
    compare = _script()
    prof, cls = tmp_path / "profanity", tmp_path / "classifier"
    _write(prof, "a", [[0.1, 0.7], [0.2, 0.0]])
    with pytest.raises(SystemExit, match="both runs must be among"):
        compare.main([str(prof), str(cls), "a", "--pairs", "a:b", "--reference", str(tiny_model_dir)])
    with pytest.raises(SystemExit, match="classifier/a.generations.jsonl: missing"):
        compare.main([str(prof), str(cls), "a", "--reference", str(tiny_model_dir)])
    cls.mkdir()
    (cls / "a.generations.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(SystemExit, match="line 1: not a generations record"):
        compare.main([str(prof), str(cls), "a", "--reference", str(tiny_model_dir)])
