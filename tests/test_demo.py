"""``steer demo`` end to end on a tiny random model: both runs, three evaluations, the report files."""

from __future__ import annotations

import json

import pytest

from steer.demo import DemoArguments, run_demo
from steer.models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_writes_its_report_next_to_the_adapter(tmp_path, capsys):
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "demo"
    result = run_demo(
        DemoArguments(
            output_dir=str(out),
            model_name_or_path=str(tmp_path / "tiny"),
            max_steps=2,
            guidance_interval=1,
            warmup_samples=8,
            samples_per_round=8,
            eval_prompts=6,
            samples_per_prompt=2,
            clean_texts=4,
            threads=1,
        )
    )
    assert list(result["columns"]) == ["base", "plain SFT", "constrained"]
    for name in (
        "adapter_model.safetensors",
        "guidance/model.safetensors",
        "demo_report.md",
        "demo_report.png",
        "demo_report.json",
        "training_curves.png",
        "metrics.jsonl",
        "sft/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "demo_report.json").read_text())
    for column in report["columns"].values():
        low, high = column["toxicity_probability_ci95"]
        assert low <= column["toxicity_probability"] <= high
        assert column["num_prompts"] == 6 and column["num_generations"] == 12
    assert len(result["rounds"]) == 2  # the warm-up round and the one at step 1
    text = capsys.readouterr().out
    assert "[demo] plain SFT" in text and "[demo] evaluating the base model" in text
    with pytest.raises(ValueError, match="kl_coef"):
        DemoArguments(kl_coef=0)
