"""examples/inference_*.py load exported artefacts in plain code and generate what steer's own code does."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the cat sees", "good people like music and"]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from steer.models import tiny_causal_lm

    path = tmp_path_factory.mktemp("base")
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)  # GQA, like SmolLM2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base_dir).eval(), AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def constrained_export(base_dir, tmp_path_factory):
    """What `steer train constrained` writes: the policy LoRA (+ tokenizer) and guidance/ (random, non-zero)."""
    from peft import LoraConfig, get_peft_model

    from steer.guidance import GuidanceModel

    out = tmp_path_factory.mktemp("constrained")
    model, tokenizer = _load_base(base_dir)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = get_peft_model(model, config).eval()
    guidance = GuidanceModel(policy)
    with torch.no_grad():
        guidance.head.weight.normal_(std=2.0)
    policy.save_pretrained(out, selected_adapters=["default"])
    tokenizer.save_pretrained(out)
    guidance.save_pretrained(out / "guidance")
    return out, policy, guidance, tokenizer


def test_constrained_plain_peft_matches_trained_policy(constrained_export):
    out, policy, _, tokenizer = constrained_export
    example = _example("inference_constrained")
    model, loaded_tokenizer = example.load_policy(out)
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, policy(**ids).logits, atol=1e-5, rtol=1e-5)
        with policy.disable_adapter():  # the adapter really changes the model
            assert not torch.allclose(model(**ids).logits, policy(**ids).logits, atol=1e-3)
    texts = example.main([str(out), *sum((["--prompt", p] for p in PROMPTS), []), "--max_new_tokens", "6"])
    assert texts == example.generate(policy, tokenizer, PROMPTS, max_new_tokens=6)
    merged, _ = example.load_policy(out, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, policy(**ids).logits, atol=1e-4, rtol=1e-4)


def test_constrained_guided_sampling_matches_steer(constrained_export):
    from steer.guidance import guided_generate

    out, policy, guidance, tokenizer = constrained_export
    example = _example("inference_constrained")
    args = [
        str(out),
        "--prompt",
        PROMPTS[0],
        "--guided",
        "--seed",
        "3",
        "--max_new_tokens",
        "6",
        "--top_p",
        "1",
    ]
    texts = example.main(args)
    expected = guided_generate(policy, guidance, tokenizer, PROMPTS[:1], max_new_tokens=6, seed=3)
    assert texts == expected


def test_constrained_full_model_export(base_dir, tmp_path):
    example = _example("inference_constrained")
    model, tokenizer = _load_base(base_dir)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = example.load_policy(tmp_path)
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        example.load_policy(tmp_path / "missing")


@pytest.mark.slow  # a fresh interpreter importing transformers + peft
def test_constrained_script_runs(constrained_export):
    out = constrained_export[0]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "inference_constrained.py"), str(out), "--prompt", "the dog"]
        + ["--max_new_tokens", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["prompt"] == "the dog" and isinstance(line["continuation"], str)


@pytest.fixture(scope="module", params=["prefix", "embedding"])
def persona_export(request, base_dir, tmp_path_factory):
    """What `steer train persona` writes to output_dir/persona (random, clearly non-zero soft prompt)."""
    from steer.persona.soft_prompt import SoftPromptNetwork
    from steer.persona.steering import PersonaSteeredModel

    out = tmp_path_factory.mktemp(f"persona-{request.param}")
    model, tokenizer = _load_base(base_dir)
    torch.manual_seed(2)
    network = SoftPromptNetwork(4, 3, request.param, 8, model_config=model.config, init_std=1.0)
    personas = {
        "cohort:0": torch.tensor([1.0, -1.0, 0.5, 0.0]),
        "cohort:1": torch.tensor([-2.0, 1.0, 0.0, 1.0]),
    }
    steered = PersonaSteeredModel(
        model, tokenizer, network, personas=personas, metadata={"base_model": str(base_dir)}
    )
    steered.save_pretrained(out)
    return out, steered


def test_persona_plain_generation_matches_steer(persona_export):
    out, steered = persona_export
    example = _example("inference_persona")
    assert example.main([str(out), "--list"]) == ["cohort:0", "cohort:1"]
    prompts = sum((["--prompt", p] for p in PROMPTS), [])
    references = {}
    for name in ("cohort:0", "cohort:1"):
        texts = example.main([str(out), "--persona", name, *prompts, "--max_new_tokens", "6"])
        references[name] = steered.generate(PROMPTS, persona=name, max_new_tokens=6)
        assert texts == references[name]
    # the comparison is meaningful: the personas change what the model writes
    unsteered = steered.generate(PROMPTS, persona=None, max_new_tokens=6)
    assert any(texts != unsteered for texts in references.values())
    # chat prompts and an explicit vector take the same path as steer's
    vector = "0.3,0.2,0.1,-0.4"
    texts = example.main(
        [str(out), "--persona", vector, "--prompt", PROMPTS[0], "--chat", "--max_new_tokens", "6"]
    )
    assert texts == steered.generate([PROMPTS[0]], persona=[0.3, 0.2, 0.1, -0.4], chat=True, max_new_tokens=6)
    soft_prompt = example.SoftPrompt(out)
    assert soft_prompt.mode == steered.network.mode
    with pytest.raises(KeyError, match="unknown persona 'nobody'"):
        soft_prompt.persona("nobody")
    with pytest.raises(ValueError, match="expected 4"):
        soft_prompt.persona("1,2")
