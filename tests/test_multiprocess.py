"""Two-rank CPU training through ``accelerate launch --config_file accelerate_configs/multi_cpu.yaml``.

Each run launches the steer CLI (``steer.cli.run``, what ``-m steer.cli`` calls) under accelerate on a tiny
random model, then checks: both ranks ran with world size 2 over gloo, the ranks end with identical trained
weights, the guidance model / soft-prompt network really trained, and the exported artefacts reloaded in
plain code give the same outputs as the trained model in the training process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG = ROOT / "accelerate_configs" / "multi_cpu.yaml"
TIMEOUT_S = 300

# Launched as `accelerate launch ... -m steer_mp_driver <steer arguments>`: runs the CLI exactly like
# `-m steer.cli`, then records per-rank digests and (rank 0) the trained model's outputs for comparison.
DRIVER = r"""
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from steer import cli

cli._setup_logging()
trainer = cli.run(sys.argv[1:])
args = trainer.args
out = Path(args.output_dir)
digest, count = cli.parameter_digest(cli._result_modules(trainer))
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


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate() -> list[str]:
    binary = Path(sys.executable).with_name("accelerate")
    return [str(binary)] if binary.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def launch(steer_args: list[str], workdir: Path) -> tuple[str, float]:
    """``accelerate launch --config_file multi_cpu.yaml -m steer_mp_driver <steer_args>``; returns (log, seconds)."""
    (workdir / "steer_mp_driver.py").write_text(DRIVER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("ACCELERATE_USE_CPU", None)  # the CLI must work out CPU + gloo by itself
    launcher = _accelerate()
    if launcher[0].endswith("accelerate"):
        launcher.append("launch")
    cmd = [
        *launcher,
        "--config_file",
        str(ACCELERATE_CONFIG),
        "--main_process_port",
        str(_free_port()),
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
    launcher = _accelerate()
    if launcher[0].endswith("accelerate"):
        launcher.append("launch")
    cmd = [*launcher, "--config_file", str(config), "--main_process_port", str(_free_port())]
    cmd += ["-m", "steer.cli", *steer_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the launch should have failed:\n{log[-3000:]}"
    return log


def _check_two_ranks(log: str, out: Path, command: str) -> None:
    for rank in (0, 1):
        assert f"{command}: rank {rank}/2 " in log, f"rank {rank} did not report world size 2:\n{log[-3000:]}"
    assert "distributed_type=MULTI_CPU, backend=gloo" in log
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert ranks[0]["count"] > 0
    assert ranks[0]["digest"] == ranks[1]["digest"], "ranks ended with different trained weights"
    assert f"{command}: all 2 ranks hold identical trained weights" in log


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from helpers.models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _corpus(path: Path) -> Path:
    from steer.models import _tiny_corpus

    sentences = _tiny_corpus(3, 160)
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
        str(_corpus(tmp_path / "corpus.jsonl")),
        "--constraint",
        "keyword",
        "--constraint_kwargs",
        json.dumps({"banned": list(banned)}),
    ]


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
    _check_two_ranks(log, out, "train constrained")

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
    example_policy, _ = _example("inference_constrained").load_policy(out)
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
    _check_two_ranks(log, out, "train persona")

    # the soft-prompt network trained: its zero-initialised output bias moved
    weights = load_file(str(out / "persona" / "soft_prompt.safetensors"))
    assert weights["mlp.2.bias"].abs().sum() > 0
    assert "'loss'" in log

    expected = load_file(str(out / "inprocess.safetensors"))
    steered = PersonaSteeredModel.from_pretrained(str(tiny_model_dir), out / "persona")
    probs = steered.option_probs("Do you like music?", ["Yes", "Somewhat", "No"], expected["persona"])
    torch.testing.assert_close(probs, expected["option_probs"], atol=1e-6, rtol=1e-5)
    # examples/inference_persona.py (plain transformers) on the real export generates what steer generates
    example = _example("inference_persona")
    names = example.main([str(out / "persona"), "--list"])
    assert "cohort:0" in names and any(n.startswith("POLPARTY=") for n in names)
    prompts = ["Do you like music?", "the city at night"]
    texts = example.main([str(out / "persona"), "--persona", "cohort:0", "--max_new_tokens", "5"]
                         + sum((["--prompt", p] for p in prompts), []))  # fmt: skip
    assert texts == steered.generate(prompts, persona="cohort:0", max_new_tokens=5)
