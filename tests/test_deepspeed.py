"""Two-rank DeepSpeed ZeRO-3 training on CPU through ``accelerate launch --config_file accelerate_configs/zero3_cpu.yaml``.

accelerate 1.15 runs DeepSpeed only with ``use_cpu`` off; on a machine without an accelerator steer's CLI then
defaults ``use_cpu: false`` and ``ddp_backend: gloo`` and sets ``DS_ACCELERATOR=cpu``. The persona run checks
that the ranks really trained under ZeRO-3 (``DistributedType.DEEPSPEED``, partitioned parameters), that the
losses of the first steps match a single-process run over the same global batches, that the ranks end with
identical weights (digests over the gathered weights), that the exported artefacts reloaded in plain code give
the same outputs as the trainer's own model, and that resuming from a checkpoint reproduces the uninterrupted
run. The constrained trainer runs under ZeRO-2 (``zero2_cpu.yaml``: its losses and weights equal DDP's on the same
ranks) and refuses ZeRO-3 in one line (see ``ConstrainedTrainer.create_accelerator_and_postprocess``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import test_fsdp2 as f2
import test_multiprocess as mp
import torch
from safetensors.torch import load_file
from test_multiprocess import tiny_model_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
ZERO3_CPU_CONFIG = ROOT / "accelerate_configs" / "zero3_cpu.yaml"
ZERO2_CPU_CONFIG = ROOT / "accelerate_configs" / "zero2_cpu.yaml"
LOSS_RTOL = 1e-5  # first steps' losses, 2 ZeRO-3 ranks vs one process (same global batches)
WEIGHT_ATOL = 1e-5
OUTPUT_ATOL = 1e-5

# test_fsdp2's driver, counting ZeRO-3 partitioned parameters instead of DTensors
DRIVER = f2.DRIVER.replace(
    "sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters())",
    "sharded = sum(hasattr(p, 'ds_id') and p.ds_tensor.numel() < p.ds_numel for p in trainer.model.parameters())",
)
assert DRIVER != f2.DRIVER

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (make install installs it)",
)


def launch_zero(steer_args: list[str], workdir: Path, monkeypatch, config: Path = ZERO3_CPU_CONFIG) -> str:
    monkeypatch.setattr(mp, "ACCELERATE_CONFIG", config)
    monkeypatch.setattr(mp, "DRIVER", DRIVER)
    log, seconds = mp.launch(steer_args, workdir)
    print(f"{config.stem} 2-rank run: {seconds:.1f} s")
    return log


def _check_zero_ranks(log: str, out: Path, command: str, *, partitioned: bool = True) -> list[dict]:
    for rank in (0, 1):
        assert f"{command}: rank {rank}/2 " in log, f"rank {rank} did not report world size 2:\n{log[-3000:]}"
    assert "distributed_type=DEEPSPEED, backend=gloo" in log
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["distributed_type"] for r in ranks] == ["DEEPSPEED", "DEEPSPEED"]
    if partitioned:
        assert all(r["sharded_parameters"] > 0 for r in ranks), (
            "no partitioned parameters: ZeRO-3 did not shard"
        )
    else:  # ZeRO-2 shards optimizer state and gradients, not the parameters
        assert all(r["sharded_parameters"] == 0 for r in ranks)
    assert ranks[0]["count"] > 0
    assert ranks[0]["digest"] == ranks[1]["digest"], "ranks ended with different trained weights"
    assert f"{command}: all 2 ranks hold identical trained weights" in log
    return ranks


def test_zero3_cpu_config_is_zero3_without_use_cpu():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(ZERO3_CPU_CONFIG), "train.py"])
    )
    assert args.use_deepspeed and not args.cpu and args.num_processes == 2
    assert args.zero_stage == 3 and args.mixed_precision == "no"


def test_the_cli_keeps_deepspeed_on_cpu_ranks(monkeypatch):
    """No accelerator + a DeepSpeed launch: use_cpu off, gloo, DS_ACCELERATOR=cpu (not the DDP fallback)."""
    from steer import cli

    monkeypatch.setattr(cli, "_accelerator_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cli._use_cpu_when_no_accelerator()
    assert "ACCELERATE_USE_CPU" not in cli.os.environ and cli.os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    cli._use_cpu_when_no_accelerator()
    assert cli.os.environ["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.slow
@needs_deepspeed
def test_persona_zero3(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    from steer.persona.steering import PersonaSteeredModel

    out = tmp_path / "out"
    common = [
        "train",
        "persona",
        "--config",
        str(ROOT / "recipes" / "tiny" / "persona.yaml"),
        "--model_name_or_path",
        str(tiny_model_dir),
    ]
    args = [*common, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2"]
    log = launch_zero(args, tmp_path, monkeypatch)
    ranks = _check_zero_ranks(log, out, "train persona")
    assert ranks[0]["global_step"] == 4 and len(ranks[0]["losses"]) == 4

    # the soft-prompt network trained and was saved with full weights
    weights = load_file(str(out / "persona" / "soft_prompt.safetensors"))
    assert weights["mlp.2.bias"].abs().sum() > 0
    checkpoint = load_file(str(out / "checkpoint-4" / "soft_prompt.safetensors"))
    for name, value in weights.items():
        torch.testing.assert_close(checkpoint[name], value, atol=0, rtol=0)

    # artefacts in plain code = the trainer's model (its engine forward, and the network on the LM)
    expected = load_file(str(out / "inprocess.safetensors"))
    torch.testing.assert_close(expected["wrapped_probs"], expected["option_probs"], atol=OUTPUT_ATOL, rtol=0)
    steered = PersonaSteeredModel.from_pretrained(str(tiny_model_dir), out / "persona")
    probs = steered.option_probs("Do you like music?", ["Yes", "Somewhat", "No"], expected["persona"])
    torch.testing.assert_close(probs, expected["option_probs"], atol=OUTPUT_ATOL, rtol=0)

    # one process over the same global batches (2 ranks x 4 = 8 examples per step): the same losses
    single = tmp_path / "single"
    single.mkdir()
    f2.run_single(
        [*common, "--output_dir", str(single / "out"), "--per_device_train_batch_size", "8"], single
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
    first = {name: value.clone() for name, value in weights.items()}
    shutil.rmtree(out / "checkpoint-4")
    log = launch_zero([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")], tmp_path, monkeypatch)
    resumed = _check_zero_ranks(log, out, "train persona")
    assert resumed[0]["global_step"] == 4
    assert resumed[0]["digest"] == ranks[0]["digest"], "resumed run ended with other weights"
    torch.testing.assert_close(
        torch.tensor(resumed[0]["losses"][-2:]), torch.tensor(ranks[0]["losses"][-2:]), rtol=1e-6, atol=0
    )
    again = load_file(str(out / "persona" / "soft_prompt.safetensors"))
    for name, value in first.items():
        torch.testing.assert_close(again[name], value, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# ConstrainedTrainer
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_deepspeed
def test_constrained_zero2_equals_ddp(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    """ZeRO-2 on 2 CPU ranks: the guidance rounds, the KL and the saved artefacts as under DDP (same ranks, data
    and seeds), and resume from a DeepSpeed checkpoint reproduces the uninterrupted run."""
    out = tmp_path / "out"
    common = mp.constrained_args(tmp_path, tiny_model_dir)
    args = [*common, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2"]
    log = launch_zero(args, tmp_path, monkeypatch, ZERO2_CPU_CONFIG)
    ranks = _check_zero_ranks(log, out, "train constrained", partitioned=False)
    assert ranks[0]["global_step"] == 4 and "guidance/loss" in log
    assert ranks[0]["guidance_digest"] and ranks[0]["guidance_digest"] == ranks[1]["guidance_digest"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert sum(float(v.abs().sum()) for k, v in adapter.items() if "lora_B" in k) > 0

    ddp = tmp_path / "ddp"
    ddp.mkdir()
    monkeypatch.setattr(mp, "ACCELERATE_CONFIG", ROOT / "accelerate_configs" / "multi_cpu.yaml")
    mp.launch([*common, "--output_dir", str(ddp / "out")], ddp)
    reference = json.loads((ddp / "out" / "rank0.json").read_text())
    assert reference["distributed_type"] == "MULTI_CPU"
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]), rtol=LOSS_RTOL, atol=0
    )
    assert ranks[0]["guidance_digest"] == reference["guidance_digest"]
    ddp_adapter = load_file(str(ddp / "out" / "adapter_model.safetensors"))
    for name, value in adapter.items():
        torch.testing.assert_close(value, ddp_adapter[name], atol=WEIGHT_ATOL, rtol=0)

    shutil.rmtree(out / "checkpoint-4")
    log = launch_zero(
        [*args, "--resume_from_checkpoint", str(out / "checkpoint-2")],
        tmp_path,
        monkeypatch,
        ZERO2_CPU_CONFIG,
    )
    resumed = _check_zero_ranks(log, out, "train constrained", partitioned=False)
    assert resumed[0]["global_step"] == 4
    assert resumed[0]["digest"] == ranks[0]["digest"], "resumed run ended with another policy"
    assert resumed[0]["guidance_digest"] == ranks[0]["guidance_digest"], "resumed run: another guidance model"


@pytest.mark.slow
@needs_deepspeed
def test_constrained_zero3_is_refused_in_one_line(tmp_path, tiny_model_dir):  # noqa: F811
    launcher = mp._accelerate()
    if launcher[0].endswith("accelerate"):
        launcher.append("launch")
    cmd = [
        *launcher,
        "--config_file",
        str(ZERO3_CPU_CONFIG),
        "--main_process_port",
        str(mp._free_port()),
        "-m",
        "steer.cli",
        *mp.constrained_args(tmp_path, tiny_model_dir),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=mp.TIMEOUT_S, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "steer train constrained: error: ConstrainedTrainer does not support DeepSpeed ZeRO-3" in log, log[
        -3000:
    ]
