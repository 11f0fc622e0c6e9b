"""Two-rank CPU training through ``accelerate launch --config_file accelerate_configs/multi_cpu.yaml``.

Each run launches the steer CLI (``steer.cli.run``, what ``-m steer.cli`` calls) under accelerate on a tiny
random model, then checks: both ranks ran with world size 2 over gloo, the ranks end with identical trained
weights, the guidance model / soft-prompt network really trained, and the exported artefacts reloaded in
plain code give the same outputs as the trained model in the training process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers.launch import ROOT, check_two_ranks, constrained_args, launch, load_example
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_constrained_two_ranks(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steer.guidance import GuidanceModel

    out = tmp_path / "out"
    log, seconds = launch(
        [
            *constrained_args(tmp_path, tiny_model_dir),
            "--output_dir",
            str(out),
        ],
        tmp_path,
    )
    print(f"constrained 2-rank run: {seconds:.1f} s")
    check_two_ranks(log, out, "train constrained")

    # the guidance model trained (rounds logged) and every rank holds the same one: one token prior for
    # all ranks (rank 0 computes and caches it first), gradients averaged in every round
    assert "guidance/loss" in log
    entries = [int(n) for n in re.findall(r"context prior: .*?(\d+) entries", log)]
    assert entries and min(entries) > 0, "the context prior (split banned words) should have entries"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["guidance_digest"] and ranks[0]["guidance_digest"] == ranks[1]["guidance_digest"]
    guidance = load_file(str(out / "guidance" / "model.safetensors"))
    assert (out / "guidance" / "context_prior.safetensors").is_file()  # saved with the guidance model
    assert (
        guidance["head.weight"].abs().sum() > 0
    )  # zero-initialised weights moved (the bias holds the prior)
    # the policy adapter holds real (non-empty, trained) weights
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in lora_b)
    assert sum(float(v.abs().sum()) for v in lora_b) > 0

    # plain transformers + peft (both by hand and through examples/inference_constrained.py):
    # the same logits as the trained model inside the training process
    expected = load_file(str(out / "inprocess.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, out).eval()
    example_policy, _ = load_example("inference_constrained").load_policy(out)
    with torch.no_grad():
        logits = example_policy(
            input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]
        ).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits = policy(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
    guidance_model = GuidanceModel.from_pretrained(out / "guidance", policy)
    with torch.no_grad():
        z = guidance_model(expected["input_ids"], attention_mask=expected["attention_mask"])
    torch.testing.assert_close(z, expected["z"], atol=1e-5, rtol=1e-5)


def test_persona_two_ranks(tmp_path, tiny_model_dir):
    from steer.data import opinionqa_dir
    from steer.persona.steering import PersonaSteeredModel

    try:
        root = opinionqa_dir()
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"OpinionQA data not available: {err}")
    if root is None or not Path(root).is_dir():
        pytest.skip("OpinionQA data not available")

    out = tmp_path / "out"
    log, seconds = launch(
        [
            "train",
            "persona",
            "--config",
            str(ROOT / "recipes" / "tiny" / "persona.yaml"),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--output_dir",
            str(out),
        ],
        tmp_path,
    )
    print(f"persona 2-rank run: {seconds:.1f} s")
    check_two_ranks(log, out, "train persona")

    # the soft-prompt network trained: its zero-initialised output bias moved
    weights = load_file(str(out / "persona" / "soft_prompt.safetensors"))
    assert weights["mlp.2.bias"].abs().sum() > 0
    assert "'loss'" in log

    expected = load_file(str(out / "inprocess.safetensors"))
    steered = PersonaSteeredModel.from_pretrained(str(tiny_model_dir), out / "persona")
    probs = steered.option_probs("Do you like music?", ["Yes", "Somewhat", "No"], expected["persona"])
    torch.testing.assert_close(probs, expected["option_probs"], atol=1e-6, rtol=1e-5)
    # examples/inference_persona.py (plain transformers) on the real export generates what steer generates
    example = load_example("inference_persona")
    names = example.main([str(out / "persona"), "--list"])
    assert "cohort:0" in names and any(n.startswith("POLPARTY=") for n in names)
    prompts = ["Do you like music?", "the city at night"]
    texts = example.main([str(out / "persona"), "--persona", "cohort:0", "--max_new_tokens", "5"]
                         + sum((["--prompt", p] for p in prompts), []))  # fmt: skip
    assert texts == steered.generate(prompts, persona="cohort:0", max_new_tokens=5)
