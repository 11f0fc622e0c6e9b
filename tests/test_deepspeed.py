"""Two-rank DeepSpeed ZeRO-3 training on CPU through ``accelerate launch --config_file accelerate_configs/zero3_cpu.yaml``.

accelerate 1.15 runs DeepSpeed only with ``use_cpu`` off; on a machine without an accelerator steer's CLI then
defaults ``use_cpu: false`` and ``ddp_backend: gloo`` and sets ``DS_ACCELERATOR=cpu``. The persona run checks
that the ranks really trained under ZeRO-3 (``DistributedType.DEEPSPEED``, partitioned parameters), that the
losses of the first steps match a single-process run over the same global batches, that the ranks end with
identical weights (digests over the gathered weights), that the exported artefacts reloaded in plain code give
the same outputs as the trainer's own model, and that resuming from a checkpoint reproduces the uninterrupted
run. The constrained trainer runs under ZeRO-2 and ZeRO-3: its losses, guidance model and adapter equal DDP's on
the same ranks, its artefacts reload in plain code, and resume restores the guidance state and reproduces the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers.launch import ROOT, SHARDED_DRIVER, constrained_args, launch, launch_failing
from helpers.sharded import check_constrained_artefacts, check_equals_ddp, check_persona_run

ZERO3_CPU_CONFIG = ROOT / "accelerate_configs" / "zero3_cpu.yaml"
ZERO2_CPU_CONFIG = ROOT / "accelerate_configs" / "zero2_cpu.yaml"

# the sharded (FSDP2) driver, counting ZeRO-3 partitioned parameters instead of DTensors (also the guidance model's)
_PARTITIONED = "sum(hasattr(p, 'ds_id') and p.ds_tensor.numel() < p.ds_numel for p in {})"
DRIVER = SHARDED_DRIVER.replace(
    "sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters())",
    "sharded = " + _PARTITIONED.format("trainer.model.parameters()") + "\n"
    "guidance_partitioned = "
    + _PARTITIONED.format(
        "(trainer.guidance.trainable_parameters() if hasattr(trainer, 'guidance') else [])"
    ),
).replace(
    '"sharded_parameters": sharded,',
    '"sharded_parameters": sharded, "guidance_partitioned": guidance_partitioned,',
)
assert DRIVER.count("guidance_partitioned") == 3

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (make install installs it)",
)


def launch_zero(steer_args: list[str], workdir: Path, config: Path = ZERO3_CPU_CONFIG) -> str:
    log, seconds = launch(steer_args, workdir, config=config, driver=DRIVER)
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
    from steer.cli import devices

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    devices.use_cpu_when_no_accelerator(available=lambda: False)
    assert "ACCELERATE_USE_CPU" not in os.environ and os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    devices.use_cpu_when_no_accelerator(available=lambda: False)
    assert os.environ["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.slow
@needs_deepspeed
def test_persona_zero3(tmp_path, tiny_model_dir):
    """The FSDP2 persona checks (helpers.sharded.check_persona_run) under ZeRO-3, with partitioned parameters."""
    check_persona_run(
        tmp_path,
        tiny_model_dir,
        lambda args: launch_zero(args, tmp_path),
        lambda log, out: _check_zero_ranks(log, out, "train persona"),
        DRIVER,
    )


# --------------------------------------------------------------------------------------------------
# ConstrainedTrainer
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_constrained_zero_equals_ddp(tmp_path, tiny_model_dir, stage):
    """ZeRO-2 and ZeRO-3 on 2 CPU ranks: the guidance rounds, the KL and the saved artefacts as under DDP (same
    ranks, data and seeds), and resume from a DeepSpeed checkpoint reproduces the uninterrupted run. Under ZeRO-3
    the rounds and each step's KL run on gathered weights with DeepSpeed's module hooks off
    (sharding.zero3_whole); the guidance adapter, partitioned with the policy, is gathered to be saved."""
    config = ZERO3_CPU_CONFIG if stage == 3 else ZERO2_CPU_CONFIG
    out = tmp_path / "out"
    common = constrained_args(tmp_path, tiny_model_dir)
    args = [*common, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2"]
    log = launch_zero(args, tmp_path, config)
    ranks = _check_zero_ranks(log, out, "train constrained", partitioned=stage == 3)
    # ZeRO-3 partitions the guidance adapter with the policy: saving and checkpoints must gather it
    assert (ranks[0]["guidance_partitioned"] > 0) == (stage == 3)
    check_constrained_artefacts(log, out, ranks, tiny_model_dir)
    reference = check_equals_ddp(common, out, ranks, tmp_path, DRIVER)
    assert ranks[0]["guidance_digest"] == reference["guidance_digest"]

    shutil.rmtree(out / "checkpoint-4")
    log = launch_zero([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")], tmp_path, config)
    resumed = _check_zero_ranks(log, out, "train constrained", partitioned=stage == 3)
    # the guidance model, its optimizer, buffers and round counter came back (DeepSpeed's resume path does not
    # call _load_from_checkpoint): no second warm-up round, only the round due at step 2
    assert "guidance round 0:" not in log and "guidance round 1:" in log
    assert resumed[0]["global_step"] == 4
    assert resumed[0]["digest"] == ranks[0]["digest"], "resumed run ended with another policy"
    assert resumed[0]["guidance_digest"] == ranks[0]["guidance_digest"], "resumed run: another guidance model"


@pytest.mark.slow
@needs_deepspeed
def test_constrained_zero3_refuses_a_background_schedule_in_one_line(tmp_path, tiny_model_dir):
    args = [*constrained_args(tmp_path, tiny_model_dir), "--output_dir", str(tmp_path / "out")]
    log = launch_failing(ZERO3_CPU_CONFIG, [*args, "--schedule", "parallel"], tmp_path)
    assert "error: ConstrainedTrainer under DeepSpeed ZeRO-3 needs a PEFT policy" in log, log[-3000:]
    assert "schedule='parallel'" in log
