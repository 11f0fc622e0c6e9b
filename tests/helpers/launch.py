"""Launching steer under ``accelerate launch`` on CPU ranks (gloo) for the multi-process tests.

``launch`` runs ``-m steer_mp_driver <steer arguments>`` with a driver that runs the CLI exactly like
``-m steer.cli`` and then records per-rank digests and (rank 0) the trained model's outputs: the multi-CPU
(DDP) driver, or the sharded one (FSDP2 / DeepSpeed: collective digests, sharded parameter counts, losses).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "accelerate_configs"
MULTI_CPU_CONFIG = CONFIGS / "multi_cpu.yaml"
FSDP2_CPU_CONFIG = CONFIGS / "fsdp2_cpu.yaml"
TIMEOUT_S = 300

# `accelerate launch ... -m steer_mp_driver <steer arguments>` under DDP: per-rank digests and (rank 0) the
# trained model's outputs for comparison.
MULTI_CPU_DRIVER = r"""
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from steer import cli

cli.setup_logging()
trainer = cli.run(sys.argv[1:])
args = trainer.args
out = Path(args.output_dir)
digest, count = cli.parameter_digest(cli.result_modules(trainer))
state = args.distributed_state
guidance_digest = cli.parameter_digest([trainer.guidance])[0] if hasattr(trainer, "guidance") else ""
(out / f"rank{args.process_index}.json").write_text(json.dumps({
    "rank": args.process_index, "world_size": args.world_size, "digest": digest, "count": count,
    "guidance_digest": guidance_digest,
    "distributed_type": str(state.distributed_type.value), "backend": state.backend,
}))
if args.process_index == 0:
    tokenizer = trainer.processing_class
    with torch.no_grad():
        if sys.argv[2] == "constrained":
            model = trainer.accelerator.unwrap_model(trainer.model).eval()
            ids = tokenizer(["the cat sees a dog", "good people like music"], return_tensors="pt", padding=True)
            logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
            z = trainer.guidance(ids["input_ids"], attention_mask=ids["attention_mask"])
            tensors = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
                       "logits": logits, "z": z}
        else:
            from steer.persona.steering import PersonaSteeredModel

            inner = trainer.accelerator.unwrap_model(trainer.model)
            steered = PersonaSteeredModel(inner.model, tokenizer, trainer.network,
                                          prompt_format=trainer.prompt_format)
            dim = trainer.network.config.persona_dim
            persona = torch.linspace(-1.0, 1.0, dim)
            probs = steered.option_probs("Do you like music?", ["Yes", "Somewhat", "No"], persona)
            tensors = {"persona": persona, "option_probs": probs}
    save_file({k: v.detach().contiguous().float() if v.is_floating_point() else v.contiguous()
               for k, v in tensors.items()}, str(out / "inprocess.safetensors"))
cli.shutdown_distributed()  # what `steer` (cli.main) does on exit
"""

# Under FSDP2 (or, adapted, DeepSpeed), or as `python -m steer_mp_driver` for the single-process reference:
# every rank runs the collective parts (digest over gathered weights, the sharded model's forward); rank 0 writes
# the reference outputs.
SHARDED_DRIVER = r"""
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from steer import cli

cli.setup_logging()
trainer = cli.run(sys.argv[1:])
args = trainer.args
out = Path(args.output_dir)
digest, count = cli.parameter_digest(cli.result_modules(trainer))  # gathers sharded weights (all ranks)
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
                                        "scale": [0.0, 0.5, 1.0], "persona": persona.tolist()}])
        model = trainer.model.eval()
        wrapped = model(**{k: v.to(args.device) for k, v in batch.items()}).option_logits.softmax(-1)[0]
        # the gathered network on the replicated LM (plain, rank-local code)
        inner = trainer.accelerator.unwrap_model(trainer.model)
        steered = PersonaSteeredModel(inner.model, tokenizer, trainer.network, prompt_format=trainer.prompt_format)
        probs = steered.option_probs("Do you like music?", options, persona, scale=[0.0, 0.5, 1.0])
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


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launcher() -> list[str]:
    binary = Path(sys.executable).with_name("accelerate")
    return [str(binary)] if binary.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def launch(
    steer_args: list[str], workdir: Path, *, config: Path = MULTI_CPU_CONFIG, driver: str = MULTI_CPU_DRIVER
) -> tuple[str, float]:
    """``accelerate launch --config_file config -m steer_mp_driver <steer_args>`` with ``driver`` as the
    ``steer_mp_driver`` module; returns (log, seconds)."""
    (workdir / "steer_mp_driver.py").write_text(driver)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("ACCELERATE_USE_CPU", None)  # the CLI must work out CPU + gloo by itself
    launcher = accelerate_launcher()
    if launcher[0].endswith("accelerate"):
        launcher.append("launch")
    cmd = [
        *launcher,
        "--config_file",
        str(config),
        "--main_process_port",
        str(free_port()),
        "-m",
        "steer_mp_driver",
        *steer_args,
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{log[-6000:]}"
    return log, seconds


def launch_failing(config: Path, steer_args: list[str], workdir: Path) -> str:
    """``accelerate launch --config_file config -m steer.cli <steer_args>`` that must fail; returns its log."""
    launcher = accelerate_launcher()
    if launcher[0].endswith("accelerate"):
        launcher.append("launch")
    cmd = [*launcher, "--config_file", str(config), "--main_process_port", str(free_port())]
    cmd += ["-m", "steer.cli", *steer_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the launch should have failed:\n{log[-3000:]}"
    return log


def check_two_ranks(log: str, out: Path, command: str) -> None:
    for rank in (0, 1):
        assert f"{command}: rank {rank}/2 " in log, f"rank {rank} did not report world size 2:\n{log[-3000:]}"
    assert "distributed_type=MULTI_CPU, backend=gloo" in log
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert ranks[0]["count"] > 0
    assert ranks[0]["digest"] == ranks[1]["digest"], "ranks ended with different trained weights"
    assert f"{command}: all 2 ranks hold identical trained weights" in log


def tiny_corpus_file(path: Path) -> Path:
    from steer.models import tiny_corpus

    sentences = tiny_corpus(3, 160)
    with path.open("w") as handle:
        for i in range(0, 160, 2):
            handle.write(json.dumps({"prompt": sentences[i], "completion": " " + sentences[i + 1]}) + "\n")
    return path


def constrained_args(tmp_path, model_dir, banned=("the", "a", "is", "bad")) -> list[str]:
    """``steer train constrained`` arguments of the tiny recipe on a tiny corpus and a keyword constraint ("bad" is
    " b" + "ad" for the tiny tokenizer: the recipe's context prior has entries, on every rank)."""
    return [
        "train",
        "constrained",
        "--config",
        str(ROOT / "recipes" / "tiny" / "constrained.yaml"),
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(tiny_corpus_file(tmp_path / "corpus.jsonl")),
        "--constraint",
        "keyword",
        "--constraint_kwargs",
        json.dumps({"banned": list(banned)}),
    ]


def run_single(steer_args: list[str], workdir: Path, driver: str = SHARDED_DRIVER) -> None:
    """The same driver in one plain process (no accelerate launch): the reference run."""
    (workdir / "steer_mp_driver.py").write_text(driver)
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
        timeout=TIMEOUT_S,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"single-process run failed ({proc.returncode}):\n{log[-6000:]}"
