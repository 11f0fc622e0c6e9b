"""Two-rank FSDP2 training on CPU through ``accelerate launch --config_file accelerate_configs/fsdp2_cpu.yaml``.

Uses the launcher of ``tests/helpers/launch.py`` with the FSDP2 config and the sharded driver. Each run checks that
the ranks really trained sharded (``DistributedType.FSDP``, ``DTensor`` parameters), that the losses of the
first steps match a single-process run over the same global batches, that the ranks end with identical
weights (digests over the gathered full weights), that the exported artefacts reloaded in plain code give the
same outputs as the trainer's own (sharded) model, and that resuming from a checkpoint reproduces the
uninterrupted run.

The constrained run is also compared with DDP (``multi_cpu.yaml``) on the same two ranks: same data, same
per-rank sampling seeds, hence the same guidance rounds; FSDP2 must give the same losses and weights.
Tolerances: see ``tests/helpers/sharded.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.launch import (
    FSDP2_CPU_CONFIG,
    ROOT,
    SHARDED_DRIVER,
    constrained_args,
    launch,
    launch_failing,
    run_single,
)
from helpers.sharded import (
    GUIDED_LOSS_RTOL,
    LOSS_RTOL,
    check_constrained_artefacts,
    check_equals_ddp,
    check_persona_run,
)


def launch_fsdp2(steer_args: list[str], workdir: Path) -> str:
    """``launch`` with the FSDP2 CPU config and the sharded driver."""
    log, seconds = launch(steer_args, workdir, config=FSDP2_CPU_CONFIG, driver=SHARDED_DRIVER)
    print(f"FSDP2 2-rank run: {seconds:.1f} s")
    return log


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _check_fsdp2_ranks(log: str, out: Path, command: str) -> list[dict]:
    for rank in (0, 1):
        assert f"{command}: rank {rank}/2 " in log, f"rank {rank} did not report world size 2:\n{log[-3000:]}"
    assert "FSDP2 on CPU ranks (gloo)" in log  # accelerate's MULTI_CPU state promoted to FSDP
    ranks = _ranks(out)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["distributed_type"] for r in ranks] == ["FSDP", "FSDP"]
    assert all(r["sharded_parameters"] > 0 for r in ranks), "no DTensor parameters: the model was not sharded"
    assert ranks[0]["count"] > 0
    assert ranks[0]["digest"] == ranks[1]["digest"], "ranks ended with different trained weights"
    assert f"{command}: all 2 ranks hold identical trained weights" in log
    return ranks


# --------------------------------------------------------------------------------------------------
# Configs (fast)
# --------------------------------------------------------------------------------------------------


def test_fsdp2_cpu_config_launches_fsdp2_ranks():
    """fsdp2_cpu.yaml: an FSDP2 launch of 2 ranks, fp32, the same FSDP settings as the GPU fsdp2.yaml."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(FSDP2_CPU_CONFIG))
    gpu = load_config_from_file(str(ROOT / "accelerate_configs" / "fsdp2.yaml"))
    assert config.distributed_type == gpu.distributed_type == DistributedType.FSDP
    assert config.num_processes == 2 and config.mixed_precision == "no"
    assert config.fsdp_config == gpu.fsdp_config and config.fsdp_config["fsdp_version"] == 2
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(FSDP2_CPU_CONFIG), "train.py"])
    )
    assert args.use_fsdp and args.fsdp_version == 2 and args.num_processes == 2


def test_sharding_helpers_on_plain_modules():
    """Without FSDP2 the explicit gather/scatter steps are plain copies, and ``unsharded`` is a no-op."""
    from steer.trainers import sharding

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    state = sharding.full_state_dict(module)
    assert sorted(state) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    sharding.load_full_state_dict(target, state)
    for name, param in target.named_parameters():
        assert torch.equal(param, state[name])
    with pytest.raises(KeyError, match="no parameter"):
        sharding.load_full_state_dict(target, {"2.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        sharding.load_full_state_dict(target, {"0.weight": torch.zeros(2, 2)})
    assert sharding.fsdp_units(target) == []
    with sharding.unsharded(target):
        assert target(torch.ones(1, 3)).shape == (1, 1)


def test_deepspeed_on_cpu_ranks_is_refused(monkeypatch):
    """A ZeRO launch on CPU ranks stops with one clear line instead of training as DDP."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from steer.trainers import sharding

    cpu = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    sharding.refuse_cpu_deepspeed(cpu)  # plain DDP on CPU: fine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="fsdp2_cpu.yaml"):
        sharding.refuse_cpu_deepspeed(cpu)
    gpu = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    sharding.refuse_cpu_deepspeed(gpu)  # accelerate runs DeepSpeed itself there


# --------------------------------------------------------------------------------------------------
# PersonaTrainer
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_persona_fsdp2(tmp_path, tiny_model_dir):
    check_persona_run(
        tmp_path,
        tiny_model_dir,
        lambda args: launch_fsdp2(args, tmp_path),
        lambda log, out: _check_fsdp2_ranks(log, out, "train persona"),
        SHARDED_DRIVER,
    )


# --------------------------------------------------------------------------------------------------
# ConstrainedTrainer
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_constrained_fsdp2(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    common = constrained_args(tmp_path, tiny_model_dir)
    args = [*common, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2"]
    log = launch_fsdp2(args, tmp_path)
    ranks = _check_fsdp2_ranks(log, out, "train constrained")
    check_constrained_artefacts(log, out, ranks, tiny_model_dir)
    check_equals_ddp(common, out, ranks, tmp_path, SHARDED_DRIVER)

    # one process over the same global batches (8 rows per step). From round 0 on the guidance model trains
    # on other samples (each rank draws its own prompts and continuations), so only the SFT part of the
    # first step is the same computation; the later losses move by the KL difference only
    single = tmp_path / "single"
    single.mkdir()
    run_single([*common, "--output_dir", str(single / "out"), "--per_device_train_batch_size", "8"], single)
    alone = json.loads((single / "out" / "rank0.json").read_text())
    assert alone["distributed_type"] == "NO"
    first, first_alone = ranks[0]["history"][0], alone["history"][0]
    assert first["lm_loss"] == pytest.approx(first_alone["lm_loss"], rel=LOSS_RTOL)
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(alone["losses"]), rtol=GUIDED_LOSS_RTOL, atol=0
    )

    # resume from checkpoint-2 (FSDP checkpoint: policy, optimizer, guidance state, sample buffer, rounds)
    shutil.rmtree(out / "checkpoint-4")
    log = launch_fsdp2([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")], tmp_path)
    resumed = _check_fsdp2_ranks(log, out, "train constrained")
    assert "guidance round 0:" not in log and "guidance round 1:" in log  # the rounds' state came back
    assert resumed[0]["global_step"] == 4
    assert resumed[0]["digest"] == ranks[0]["digest"], "resumed run ended with another policy"
    assert resumed[0]["guidance_digest"] == ranks[0]["guidance_digest"], "resumed run: another guidance model"
    torch.testing.assert_close(
        torch.tensor(resumed[0]["losses"][-2:]), torch.tensor(ranks[0]["losses"][-2:]), rtol=1e-6, atol=0
    )


@pytest.mark.slow
def test_constrained_fsdp2_refuses_parallel_schedule(tmp_path, tiny_model_dir):
    """The parallel schedule's worker thread would run on a deep copy of the sharded policy: one clear line."""
    args = [
        *constrained_args(tmp_path, tiny_model_dir, banned=["the"]),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    log = launch_failing(FSDP2_CPU_CONFIG, [*args, "--schedule", "parallel"], tmp_path)
    assert (
        "steer train constrained: error: ConstrainedConfig.schedule='parallel' is not supported under FSDP2"
        in log
    ), log[-3000:]
