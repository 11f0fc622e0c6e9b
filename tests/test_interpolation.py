"""Weight-space interpolation of a trained LoRA policy toward its start (steer.interpolation, WiSE-FT)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from steer.errors import ModelLoadError
from steer.interpolation import TRAINED_POLICY_DIR, export_interpolated_policy, interpolate_adapter
from steer.models import tiny_causal_lm

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _adapter(path, seed: int, r: int = 4, alpha: int = 8, **extra):
    """A LoRA adapter with random (non-zero) A and B factors, saved to ``path``."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, **extra)
    get_peft_model(tiny_causal_lm("llama", seed=0)[0], config).save_pretrained(str(path))
    return path


def _delta(path) -> dict[str, torch.Tensor]:
    """Every weight of the base with the adapter at ``path`` merged in, minus the base's."""
    base = tiny_causal_lm("llama", seed=0)[0].state_dict()
    merged = PeftModel.from_pretrained(tiny_causal_lm("llama", seed=0)[0], str(path)).merge_and_unload()
    return {k: v - base[k] for k, v in merged.state_dict().items()}


def test_interpolation_is_the_weighted_sum_of_the_changes(tmp_path):
    trained = _adapter(tmp_path / "trained", seed=1)
    start = _adapter(tmp_path / "start", seed=2, r=2, alpha=8)  # another rank and scaling
    interpolate_adapter(trained, start, 0.3, tmp_path / "mix")
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (6, 6)
    d_trained, d_start, d_mix = _delta(trained), _delta(start), _delta(tmp_path / "mix")
    changed = [k for k, v in d_trained.items() if v.abs().max() > 1e-4]
    assert any("down_proj" in k for k in changed) and len(changed) >= 3
    for key, value in d_mix.items():
        torch.testing.assert_close(value, 0.3 * d_trained[key] + 0.7 * d_start[key], atol=1e-5, rtol=1e-4)

    interpolate_adapter(trained, None, 0.5, tmp_path / "half")  # a fresh-LoRA start: the change scaled
    config = json.loads((tmp_path / "half" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    for key, value in _delta(tmp_path / "half").items():
        torch.testing.assert_close(value, 0.5 * d_trained[key], atol=1e-5, rtol=1e-4)

    interpolate_adapter(trained, start, 1.0, tmp_path / "all")  # weight 1: the trained model
    for key, value in _delta(tmp_path / "all").items():
        torch.testing.assert_close(value, d_trained[key], atol=1e-5, rtol=1e-4)


def test_export_keeps_the_trained_adapter(tmp_path):
    run = _adapter(tmp_path / "run", seed=1)
    (run / "base_model.json").write_text('{"model_type": "llama"}')
    before = (run / "adapter_model.safetensors").read_bytes()
    start = _adapter(tmp_path / "start", seed=2)
    kept = export_interpolated_policy(run, start, 0.75)
    assert kept == run / TRAINED_POLICY_DIR
    assert (kept / "adapter_model.safetensors").read_bytes() == before
    assert (kept / "base_model.json").is_file()
    assert json.loads((run / "adapter_config.json").read_text())["r"] == 8
    for key, value in _delta(run).items():
        torch.testing.assert_close(
            value, 0.75 * _delta(kept)[key] + 0.25 * _delta(start)[key], atol=1e-5, rtol=1e-4
        )


def test_interpolation_refuses_what_it_cannot_represent(tmp_path):
    trained = _adapter(tmp_path / "trained", seed=1)
    with pytest.raises(ValueError, match="weight must be in"):
        interpolate_adapter(trained, None, 1.5, tmp_path / "out")
    with pytest.raises(ModelLoadError, match="start adapter: no adapter_config.json"):
        interpolate_adapter(trained, tmp_path / "nowhere", 0.5, tmp_path / "out")
    dora = _adapter(tmp_path / "dora", seed=2, use_dora=True)
    with pytest.raises(ModelLoadError, match="sets use_dora=True"):
        interpolate_adapter(trained, dora, 0.5, tmp_path / "out")
    torch.manual_seed(3)
    other = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(tiny_causal_lm("llama", seed=0)[0], other).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ModelLoadError, match="target_modules"):
        interpolate_adapter(trained, tmp_path / "other", 0.5, tmp_path / "out")
    base = {"model_type": "llama", "embedding_probe": [1.0]}
    (trained / "base_model.json").write_text(json.dumps(base))
    start = _adapter(tmp_path / "start", seed=4)
    (start / "base_model.json").write_text(json.dumps({**base, "embedding_probe": [2.0]}))
    with pytest.raises(ModelLoadError, match="another base model"):
        interpolate_adapter(trained, start, 0.5, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_steer_export_policy_reexports_a_run_at_another_weight(tmp_path):
    from steer.cli.commands import CommandLineError
    from steer.cli.dispatch import run as steer

    run = _adapter(tmp_path / "run", seed=1)
    start = _adapter(tmp_path / "start", seed=2)
    export_interpolated_policy(run, start, 0.8)
    assert json.loads((run / "interpolation.json").read_text()) == {"start": str(start), "weight": 0.8}
    assert not (run / TRAINED_POLICY_DIR / "interpolation.json").exists()
    out = tmp_path / "w30"
    steer(["export", "policy", "--run_dir", str(run), "--weight", "0.3", "--output_dir", str(out)])
    d_trained, d_start = _delta(run / TRAINED_POLICY_DIR), _delta(start)
    for key, value in _delta(out).items():  # the recorded start, the trained (not the exported) adapter
        torch.testing.assert_close(value, 0.3 * d_trained[key] + 0.7 * d_start[key], atol=1e-5, rtol=1e-4)
    steer(
        [
            "export",
            "policy",
            "--run_dir",
            str(run),
            "--weight",
            "0.5",
            "--start",
            "none",
            "--output_dir",
            str(tmp_path / "zero"),
        ]
    )
    for key, value in _delta(tmp_path / "zero").items():
        torch.testing.assert_close(value, 0.5 * d_trained[key], atol=1e-5, rtol=1e-4)

    bare = _adapter(tmp_path / "bare", seed=3)  # exported as trained (weight 1): no recorded start
    with pytest.raises(ModelLoadError, match=r"records no start .*pass --start"):
        steer(
            [
                "export",
                "policy",
                "--run_dir",
                str(bare),
                "--weight",
                "0.5",
                "--output_dir",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(ModelLoadError, match="exported interpolation without its trained adapter"):
        steer(
            [
                "export",
                "policy",
                "--run_dir",
                str(out),
                "--weight",
                "0.5",
                "--output_dir",
                str(tmp_path / "y"),
            ]
        )
    for argv, message in [
        (["--weight", "1.5"], "weight must be in"),
        (["--weight", "0.5", "--output_dir", str(run)], "output_dir must differ from run_dir"),
    ]:
        args = ["export", "policy", "--run_dir", str(run), "--output_dir", str(tmp_path / "z"), *argv]
        with pytest.raises(CommandLineError, match=message):
            steer(args)
