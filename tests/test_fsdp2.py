"""Two-rank FSDP2 training on CPU through ``accelerate launch --config_file accelerate_configs/fsdp2_cpu.yaml``.

Reuses the launcher of ``tests/test_multiprocess.py`` with this file's config and driver. Each run checks that
the ranks really trained sharded (``DistributedType.FSDP``, ``DTensor`` parameters), that the losses of the
first steps match a single-process run over the same global batches, that the ranks end with identical
weights (digests over the gathered full weights), that the exported artefacts reloaded in plain code give the
same outputs as the trainer's own (sharded) model, and that resuming from a checkpoint reproduces the
uninterrupted run.

The constrained run is also compared with DDP (``multi_cpu.yaml``) on the same two ranks: same data, same
per-rank sampling seeds, hence the same guidance rounds; FSDP2 must give the same losses and weights.

Tolerances: fp32 on CPU; the single-process run sums the same 8 examples per step in another order than the
two ranks' reduce-scatter: losses agreed to ~1e-7 relative when written (checked with ``LOSS_RTOL``), the
trained weights to ``WEIGHT_ATOL``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_multiprocess as mp
import torch
from safetensors.torch import load_file
from test_multiprocess import tiny_model_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
FSDP2_CPU_CONFIG = ROOT / "accelerate_configs" / "fsdp2_cpu.yaml"
LOSS_RTOL = 1e-5  # first steps' losses, 2 FSDP2 ranks vs one process (same global batches)
WEIGHT_ATOL = 1e-5  # trained weights after those steps, 2 FSDP2 ranks vs one process (or vs DDP)
# constrained, all 4 steps vs one process: from guidance round 0 on each rank samples its own prompts, so the
# guidance model (and the KL part of the loss, ~1e-3 of it) differs; agreed to ~1e-5 relative when written
GUIDED_LOSS_RTOL = 1e-4
OUTPUT_ATOL = 1e-5  # exported artefacts in plain code vs the trainer's model in the training process

# Launched as `accelerate launch --config_file fsdp2_cpu.yaml -m steer_mp_driver <steer arguments>` (or as
# `python -m steer_mp_driver` for the single-process reference). Every rank runs the collective parts
# (digest over gathered weights, the sharded model's forward); rank 0 writes the reference outputs.
DRIVER = r"""
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from steer import cli

cli._setup_logging()
trainer = cli.run(sys.argv[1:])
args = trainer.args
out = Path(args.output_dir)
digest, count = cli.parameter_digest(cli._result_modules(trainer))  # gathers sharded weights (all ranks)
state = trainer.accelerator.state
sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters())
tensors = {}
tokenizer = trainer.processing_class
with torch.no_grad():
    if sys.argv[2] == "persona":
        from steer.persona.steering import PersonaSteeredModel

        dim = trainer.network.config.persona_dim
        persona = torch.linspace(-1.0, 1.0, dim)
        options = ["Yes", "Somewhat", "No"]
        # the trainer's own (sharded) model, through its wrapped forward: a collective, every rank runs it
        batch = trainer.data_collator([{"question": "Do you like music?", "options": options, "answer": 0,
                                        "persona": persona.tolist()}])
        model = trainer.model.eval()
        wrapped = model(**{k: v.to(args.device) for k, v in batch.items()}).option_logits.softmax(-1)[0]
        # the gathered network on the replicated LM (plain, rank-local code)
        inner = trainer.accelerator.unwrap_model(trainer.model)
        steered = PersonaSteeredModel(inner.model, tokenizer, trainer.network, prompt_format=trainer.prompt_format)
        probs = steered.option_probs("Do you like music?", options, persona)
        tensors = {"persona": persona, "option_probs": probs, "wrapped_probs": wrapped}
    else:
        from steer.trainers.sharding import unsharded

        model = trainer.model.eval()
        ids = tokenizer(["the cat sees a dog", "good people like music"], return_tensors="pt", padding=True)
        # the policy through its wrapped (sharded) forward, the guidance model with the policy held unsharded
        logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        with unsharded(model):
            z = trainer.guidance(ids["input_ids"], attention_mask=ids["attention_mask"])
        tensors = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "logits": logits,
                   "z": z}
guidance_digest = cli.parameter_digest([trainer.guidance])[0] if hasattr(trainer, "guidance") else ""
(out / f"rank{args.process_index}.json").write_text(json.dumps({
    "rank": args.process_index, "world_size": args.world_size, "digest": digest, "count": count,
    "guidance_digest": guidance_digest,
    "history": [e for e in trainer.state.log_history if "loss" in e],
    "distributed_type": str(state.distributed_type.value), "sharded_parameters": sharded,
    "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    "global_step": trainer.state.global_step,
}))
if args.process_index == 0:
    save_file({k: v.detach().contiguous().float() if v.is_floating_point() else v.contiguous()
               for k, v in tensors.items()}, str(out / "inprocess.safetensors"))
cli.shutdown_distributed()
"""


def launch_fsdp2(steer_args: list[str], workdir: Path, monkeypatch) -> str:
    """test_multiprocess.launch with the FSDP2 CPU config and this file's driver."""
    monkeypatch.setattr(mp, "ACCELERATE_CONFIG", FSDP2_CPU_CONFIG)
    monkeypatch.setattr(mp, "DRIVER", DRIVER)
    log, seconds = mp.launch(steer_args, workdir)
    print(f"FSDP2 2-rank run: {seconds:.1f} s")
    return log


def run_single(steer_args: list[str], workdir: Path) -> None:
    """The same driver in one plain process (no accelerate launch): the reference run."""
    (workdir / "steer_mp_driver.py").write_text(DRIVER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "steer_mp_driver", *steer_args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=mp.TIMEOUT_S,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"single-process run failed ({proc.returncode}):\n{log[-6000:]}"


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
def test_persona_fsdp2(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    check_persona_run(
        tmp_path,
        tiny_model_dir,
        lambda args: launch_fsdp2(args, tmp_path, monkeypatch),
        lambda log, out: _check_fsdp2_ranks(log, out, "train persona"),
    )


def check_persona_run(tmp_path: Path, tiny_model_dir: Path, launch, check_ranks) -> None:  # noqa: F811
    """`train persona` on 2 sharded ranks (``launch(args) -> log``, ``check_ranks(log, out) -> ranks``): the
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
    ]
    args = [*common, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2"]
    ranks = check_ranks(launch(args), out)
    assert ranks[0]["global_step"] == 4 and len(ranks[0]["losses"]) == 4

    # the soft-prompt network trained (its zero-initialised output bias moved), saved with full weights
    weights = load_file(str(out / "persona" / "soft_prompt.safetensors"))
    assert weights["mlp.2.bias"].abs().sum() > 0
    checkpoint = load_file(str(out / "checkpoint-4" / "soft_prompt.safetensors"))
    for name, value in weights.items():
        torch.testing.assert_close(checkpoint[name], value, atol=0, rtol=0)

    # artefacts in plain code = the trainer's model: its sharded forward and the gathered network
    expected = load_file(str(out / "inprocess.safetensors"))
    torch.testing.assert_close(expected["wrapped_probs"], expected["option_probs"], atol=OUTPUT_ATOL, rtol=0)
    steered = PersonaSteeredModel.from_pretrained(str(tiny_model_dir), out / "persona")
    probs = steered.option_probs("Do you like music?", ["Yes", "Somewhat", "No"], expected["persona"])
    torch.testing.assert_close(probs, expected["option_probs"], atol=OUTPUT_ATOL, rtol=0)

    # one process over the same global batches (2 ranks x 4 = 8 examples per step): the same losses
    single = tmp_path / "single"
    single.mkdir()
    run_single([*common, "--output_dir", str(single / "out"), "--per_device_train_batch_size", "8"], single)
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
    resumed = check_ranks(launch([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")]), out)
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


def check_constrained_artefacts(log: str, out: Path, ranks: list[dict], tiny_model_dir: Path) -> None:  # noqa: F811
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


def check_equals_ddp(common: list[str], out: Path, ranks: list[dict], tmp_path: Path, monkeypatch) -> dict:
    """DDP (multi_cpu.yaml) over the same 2 ranks and data as the sharded run in ``out``: the same losses and
    policy adapter. Returns DDP's rank-0 record."""
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    monkeypatch.setattr(mp, "ACCELERATE_CONFIG", ROOT / "accelerate_configs" / "multi_cpu.yaml")
    mp.launch([*common, "--output_dir", str(ddp / "out")], ddp)
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


@pytest.mark.slow
def test_constrained_fsdp2(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    common = mp.constrained_args(tmp_path, tiny_model_dir)
    args = [*common, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2"]
    log = launch_fsdp2(args, tmp_path, monkeypatch)
    ranks = _check_fsdp2_ranks(log, out, "train constrained")
    check_constrained_artefacts(log, out, ranks, tiny_model_dir)
    check_equals_ddp(common, out, ranks, tmp_path, monkeypatch)

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
    log = launch_fsdp2([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")], tmp_path, monkeypatch)
    resumed = _check_fsdp2_ranks(log, out, "train constrained")
    assert "guidance round 0:" not in log and "guidance round 1:" in log  # the rounds' state came back
    assert resumed[0]["global_step"] == 4
    assert resumed[0]["digest"] == ranks[0]["digest"], "resumed run ended with another policy"
    assert resumed[0]["guidance_digest"] == ranks[0]["guidance_digest"], "resumed run: another guidance model"
    torch.testing.assert_close(
        torch.tensor(resumed[0]["losses"][-2:]), torch.tensor(ranks[0]["losses"][-2:]), rtol=1e-6, atol=0
    )


@pytest.mark.slow
def test_constrained_fsdp2_refuses_parallel_schedule(tmp_path, tiny_model_dir):  # noqa: F811
    """The parallel schedule's worker thread would run on a deep copy of the sharded policy: one clear line."""
    args = [
        *mp.constrained_args(tmp_path, tiny_model_dir, banned=["the"]),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    log = mp.launch_failing(FSDP2_CPU_CONFIG, [*args, "--schedule", "parallel"], tmp_path)
    assert (
        "steer train constrained: error: ConstrainedConfig.schedule='parallel' is not supported under FSDP2"
        in log
    ), log[-3000:]
