"""Checks shared by the sharded two-rank tests (FSDP2 in test_fsdp2.py, DeepSpeed ZeRO in test_deepspeed.py).

Tolerances: fp32 on CPU; the single-process run sums the same 8 examples per step in another order than the
two ranks' reduce-scatter: losses agreed to ~1e-7 relative when written (checked with ``LOSS_RTOL``), the
trained weights to ``WEIGHT_ATOL``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.launch import MULTI_CPU_CONFIG, ROOT, launch, run_single

LOSS_RTOL = 1e-5  # first steps' losses, 2 FSDP2 ranks vs one process (same global batches)
WEIGHT_ATOL = 1e-5  # trained weights after those steps, 2 FSDP2 ranks vs one process (or vs DDP)
# constrained, all 4 steps vs one process: from guidance round 0 on each rank samples its own prompts, so the
# guidance model (and the KL part of the loss, ~1e-3 of it) differs; agreed to ~1e-5 relative when written
GUIDED_LOSS_RTOL = 1e-4
OUTPUT_ATOL = 1e-5  # exported artefacts in plain code vs the trainer's model in the training process


def check_persona_run(tmp_path: Path, tiny_model_dir: Path, launch_run, check_ranks, driver: str) -> None:
    """`train persona` on 2 sharded ranks (``launch_run(args) -> log``, ``check_ranks(log, out) -> ranks``): the
    network trains and saves full weights, the artefacts reload in plain code with the trainer's outputs, the
    losses and weights equal one process over the same global batches, and resume reproduces the run."""
    from steer.data import opinionqa_dir
    from steer.persona.steering import PersonaSteeredModel

    try:
        root = opinionqa_dir()
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"OpinionQA data not available: {err}")
    if root is None or not Path(root).is_dir():
        pytest.skip("OpinionQA data not available")

    out = tmp_path / "out"
    common = [
        "train",
        "persona",
        "--config",
        str(ROOT / "recipes" / "tiny" / "persona.yaml"),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--ordinal_tilt",
        "true",  # the network's second output, read by a second call of the sharded network per step
    ]
    args = [*common, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2"]
    ranks = check_ranks(launch_run(args), out)
    assert ranks[0]["global_step"] == 4 and len(ranks[0]["losses"]) == 4

    # the soft-prompt network trained (its zero-initialised output bias moved), saved with full weights
    weights = load_file(str(out / "persona" / "soft_prompt.safetensors"))
    assert weights["mlp.2.bias"].abs().sum() > 0
    assert weights["tilt_head.weight"].abs().sum() > 0  # the zero-initialised ordinal tilt moved
    checkpoint = load_file(str(out / "checkpoint-4" / "soft_prompt.safetensors"))
    for name, value in weights.items():
        torch.testing.assert_close(checkpoint[name], value, atol=0, rtol=0)

    # artefacts in plain code = the trainer's model: its sharded forward and the gathered network
    expected = load_file(str(out / "inprocess.safetensors"))
    torch.testing.assert_close(expected["wrapped_probs"], expected["option_probs"], atol=OUTPUT_ATOL, rtol=0)
    steered = PersonaSteeredModel.from_pretrained(str(tiny_model_dir), out / "persona")
    probs = steered.option_probs(
        "Do you like music?", ["Yes", "Somewhat", "No"], expected["persona"], scale=[0.0, 0.5, 1.0]
    )
    torch.testing.assert_close(probs, expected["option_probs"], atol=OUTPUT_ATOL, rtol=0)

    # one process over the same global batches (2 ranks x 4 = 8 examples per step): the same losses
    single = tmp_path / "single"
    single.mkdir()
    run_single(
        [*common, "--output_dir", str(single / "out"), "--per_device_train_batch_size", "8"], single, driver
    )
    reference = json.loads((single / "out" / "rank0.json").read_text())
    assert reference["distributed_type"] == "NO"
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]), rtol=LOSS_RTOL, atol=0
    )
    alone = load_file(str(single / "out" / "persona" / "soft_prompt.safetensors"))
    for name, value in weights.items():
        torch.testing.assert_close(value, alone[name], atol=WEIGHT_ATOL, rtol=0)

    # resume from checkpoint-2 in the same output directory: the uninterrupted run's weights and losses
    first = {name: load_file(str(out / "persona" / "soft_prompt.safetensors"))[name] for name in weights}
    shutil.rmtree(out / "checkpoint-4")
    resumed = check_ranks(launch_run([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")]), out)
    assert resumed[0]["global_step"] == 4
    assert resumed[0]["digest"] == ranks[0]["digest"], "resumed run ended with other weights"
    torch.testing.assert_close(
        torch.tensor(resumed[0]["losses"][-2:]), torch.tensor(ranks[0]["losses"][-2:]), rtol=1e-6, atol=0
    )
    again = load_file(str(out / "persona" / "soft_prompt.safetensors"))
    for name, value in first.items():
        torch.testing.assert_close(again[name], value, atol=0, rtol=0)


def check_constrained_artefacts(log: str, out: Path, ranks: list[dict], tiny_model_dir: Path) -> None:
    """After a sharded 2-rank `train constrained`: the guidance model trained in the rounds and is the same on
    every rank; the saved adapter holds gathered, trained weights; the adapter and the guidance model reload in
    plain transformers + peft code with the logits and z of the trainer's own model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steer.guidance import GuidanceModel

    assert ranks[0]["global_step"] == 4 and len(ranks[0]["losses"]) == 4
    # the guidance model trained in the rounds (sampling + labelling + its own optimizer) on the sharded
    # policy, and every rank holds the same one (replicated, gradients all-reduced)
    assert "guidance/loss" in log
    assert ranks[0]["guidance_digest"] and ranks[0]["guidance_digest"] == ranks[1]["guidance_digest"]
    guidance = load_file(str(out / "guidance" / "model.safetensors"))
    assert guidance["head.weight"].abs().sum() > 0
    # the policy adapter: gathered full weights (not one rank's shard), trained
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and sum(float(v.abs().sum()) for v in lora_b) > 0
    assert adapter["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (8, 128)

    # plain transformers + peft: the logits of the trainer's sharded policy and z of its guidance model
    expected = load_file(str(out / "inprocess.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        logits = policy(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=OUTPUT_ATOL, rtol=OUTPUT_ATOL)
    guidance_model = GuidanceModel.from_pretrained(out / "guidance", policy)
    with torch.no_grad():
        z = guidance_model(expected["input_ids"], attention_mask=expected["attention_mask"])
    torch.testing.assert_close(z, expected["z"], atol=OUTPUT_ATOL, rtol=OUTPUT_ATOL)


def check_equals_ddp(common: list[str], out: Path, ranks: list[dict], tmp_path: Path, driver: str) -> dict:
    """DDP (multi_cpu.yaml) with the sharded run's ``driver`` over the same 2 ranks and data as the sharded run
    in ``out``: the same losses and policy adapter. Returns DDP's rank-0 record."""
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    launch([*common, "--output_dir", str(ddp / "out")], ddp, config=MULTI_CPU_CONFIG, driver=driver)
    reference = json.loads((ddp / "out" / "rank0.json").read_text())
    assert reference["distributed_type"] == "MULTI_CPU" and reference["sharded_parameters"] == 0
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]), rtol=LOSS_RTOL, atol=0
    )
    adapter = load_file(str(out / "adapter_model.safetensors"))
    ddp_adapter = load_file(str(ddp / "out" / "adapter_model.safetensors"))
    for name, value in adapter.items():
        torch.testing.assert_close(value, ddp_adapter[name], atol=WEIGHT_ATOL, rtol=0)
    return reference
