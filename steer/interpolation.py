"""Weight-space interpolation of a trained LoRA policy toward the adapter it started from (WiSE-FT).

``ΔW = w · ΔW_trained + (1 − w) · ΔW_start`` for every LoRA-wrapped module, written exactly as one LoRA adapter:
the ``A`` factors are stacked, the ``B`` factors placed side by side with each adapter's weight and scaling folded
in, so the rank is the sum of the two and ``lora_alpha`` equals it (scaling 1). Without a start adapter (a policy
trained from a fresh LoRA, ``ΔW_start = 0``) the trained ``B`` factors are scaled by ``w`` and the shape is kept.

Used by ``ConstrainedConfig.policy_export_weight``: the run's ``output_dir`` gets the interpolated adapter, the
trained one stays in its :data:`TRAINED_POLICY_DIR`, and :data:`INTERPOLATION_FILE` records the start and weight.
``steer export policy`` (:func:`run_export_policy`) re-exports a finished run at another weight.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from steer.errors import ModelLoadError
from steer.io import atomic_save_file, atomic_write, atomic_write_json

__all__ = [
    "INTERPOLATION_FILE",
    "TRAINED_POLICY_DIR",
    "ExportPolicyArguments",
    "export_interpolated_policy",
    "interpolate_adapter",
    "keep_trained_policy",
    "run_export_policy",
]

logger = logging.getLogger(__name__)

TRAINED_POLICY_DIR = "trained_policy"  # the run's trained adapter, beside the interpolated one it exported
# {"start": the start adapter's directory (as the run named it) or null, "weight": w} of an exported adapter
INTERPOLATION_FILE = "interpolation.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PLAIN_LORA = {  # adapter_config fields whose other values change what A and B mean, and the values allowed
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "lora_bias": (False, None),
    "bias": ("none", None),
}


def _read_adapter(path: Path, role: str) -> tuple[dict, dict]:
    """The ``adapter_config.json`` and safetensors weights of the LoRA adapter at ``path``; one line naming
    ``role`` and the file for anything this interpolation cannot represent exactly."""
    from safetensors.torch import load_file

    config_file, weights_file = path / ADAPTER_FILES[0], path / ADAPTER_FILES[1]
    for file in (config_file, weights_file):
        if not file.is_file():
            raise ModelLoadError(f"{role}: no {file.name} in {path} (a finished run's adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise ModelLoadError(f"{role}: {config_file} is not valid JSON ({err})") from err
    if config.get("peft_type") != "LORA":
        raise ModelLoadError(
            f"{role}: {config_file} has peft_type {config.get('peft_type')!r}; only LORA interpolates"
        )
    for key, allowed in _PLAIN_LORA.items():
        if config.get(key) not in allowed:
            raise ModelLoadError(
                f"{role}: {config_file} sets {key}={config.get(key)!r}, which interpolation does not support"
            )
    weights = load_file(str(weights_file))
    for name in weights:
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ModelLoadError(
                f"{role}: {weights_file} holds {name}; only lora_A / lora_B weights interpolate"
            )
    return config, weights


def _scaling(config: dict) -> float:
    return float(config["lora_alpha"]) / float(config["r"])


def interpolate_adapter(
    trained: str | os.PathLike,
    start: str | os.PathLike | None,
    weight: float,
    output_dir: str | os.PathLike,
) -> Path:
    """Write to ``output_dir`` the LoRA adapter with ``ΔW = weight · ΔW(trained) + (1 − weight) · ΔW(start)``.

    ``start`` None means a zero start (the trained adapter began as a fresh LoRA). Both adapters must wrap the
    same modules of the same base model; anything else is refused with one line naming the adapter and field.
    The other files of ``trained`` (tokenizer, ``base_model.json``) are copied beside the adapter. Returns
    ``output_dir``.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolate_adapter: weight must be in [0, 1], got {weight!r}")
    trained, output_dir = Path(trained), Path(output_dir)
    config, weights = _read_adapter(trained, "the trained adapter")
    scale = _scaling(config)
    if start is None:
        merged = {
            k: (v * weight if k.endswith(".lora_B.weight") else v).contiguous() for k, v in weights.items()
        }
        out_config = dict(config)
    else:
        import torch

        from steer.models import BASE_MODEL_FILE, recorded_base_model

        start = Path(start)
        start_config, start_weights = _read_adapter(start, "the start adapter")
        if sorted(start_config.get("target_modules") or []) != sorted(config.get("target_modules") or []):
            raise ModelLoadError(
                f"the start adapter {start}: target_modules {start_config.get('target_modules')!r} differ from the "
                f"trained adapter's {config.get('target_modules')!r}"
            )
        missing = sorted(set(weights) ^ set(start_weights))
        if missing:
            raise ModelLoadError(
                f"the start adapter {start}: {missing[0]} is in one adapter and not the other"
            )
        records = [recorded_base_model(path) for path in (trained, start)]
        if all(records):  # name_or_path is informative only (a hub id and its local copy are one model)
            ra, rb = ({k: v for k, v in r.items() if k != "name_or_path"} for r in records)
            if ra != rb:
                raise ModelLoadError(
                    f"the start adapter {start}: trained on another base model ({BASE_MODEL_FILE} differs)"
                )
        start_scale = _scaling(start_config)
        merged = {}
        for name, tensor in weights.items():
            if name.endswith(".lora_A.weight"):
                merged[name] = torch.cat([tensor, start_weights[name].to(tensor.dtype)], 0).contiguous()
            else:
                parts = [
                    tensor * (weight * scale),
                    start_weights[name].to(tensor.dtype) * ((1 - weight) * start_scale),
                ]
                merged[name] = torch.cat(parts, 1).contiguous()
        rank = int(config["r"]) + int(start_config["r"])
        out_config = {**config, "r": rank, "lora_alpha": rank}  # scaling 1: each part's scale is in its B
    out_config["inference_mode"] = True
    output_dir.mkdir(parents=True, exist_ok=True)
    for file in trained.iterdir():  # tokenizer, chat template, base_model.json, README
        copied = (
            file.is_file() and file.name not in ADAPTER_FILES and file.suffix in (".json", ".jinja", ".md")
        )
        if copied and file.resolve() != (output_dir / file.name).resolve():
            shutil.copyfile(file, output_dir / file.name)
    atomic_save_file(merged, output_dir / ADAPTER_FILES[1], metadata={"format": "pt"})
    atomic_write_json(output_dir / ADAPTER_FILES[0], out_config)
    record = {"start": None if start is None else str(start), "weight": weight}
    atomic_write_json(output_dir / INTERPOLATION_FILE, record)
    return output_dir


def keep_trained_policy(output_dir: str | os.PathLike) -> Path:
    """Copy the adapter files of the run in ``output_dir`` (and its ``base_model.json``) into its
    :data:`TRAINED_POLICY_DIR`, before the interpolated adapter replaces them. Returns that directory."""
    output_dir = Path(output_dir)
    kept = output_dir / TRAINED_POLICY_DIR
    kept.mkdir(parents=True, exist_ok=True)
    for file in output_dir.iterdir():
        if (
            file.is_file()
            and file.suffix in (".json", ".jinja", ".safetensors")
            and file.name not in ("trainer_state.json", INTERPOLATION_FILE)
        ):
            atomic_write(kept / file.name, lambda tmp, source=file: shutil.copyfile(source, tmp))
    return kept


def export_interpolated_policy(
    output_dir: str | os.PathLike, start: str | os.PathLike | None, weight: float
) -> Path:
    """Replace the adapter a run saved in ``output_dir`` by its interpolation toward ``start``
    (:func:`interpolate_adapter`), keeping the trained one in :data:`TRAINED_POLICY_DIR`. Returns that directory."""
    kept = keep_trained_policy(output_dir)
    interpolate_adapter(kept, start, weight, output_dir)
    toward = f"the adapter of {start}" if start is not None else "the base model"
    logger.info(
        "Exported policy: %.3g x the trained change + %.3g x %s (trained adapter: %s)",
        weight,
        1 - weight,
        toward,
        kept,
    )
    return kept


@dataclass
class ExportPolicyArguments:
    """Re-export a finished constrained run's policy at another interpolation weight (``steer export policy``)."""

    run_dir: str = field(
        metadata={
            "help": "A finished `steer train constrained` output_dir. Its trained adapter is run_dir/trained_policy "
            "when the run exported an interpolation (policy_export_weight < 1), else run_dir itself."
        }
    )
    weight: float = field(
        metadata={
            "help": "w in dW = w * dW_trained + (1 - w) * dW_start; 1 = the trained adapter, 0 = the start."
        }
    )
    output_dir: str = field(
        metadata={"help": "Where the exported adapter goes (not run_dir: the run is kept)."}
    )
    start: str | None = field(
        default=None,
        metadata={
            "help": "The adapter the change is interpolated toward: a finished adapter directory, or 'none' for a "
            "fresh-LoRA start (toward the base model). Default: the start the run recorded in interpolation.json "
            "(its policy_init_adapter or kl_reference_adapter); a run exported at weight 1 recorded none, so "
            "pass it."
        },
    )

    def __post_init__(self) -> None:
        name = "ExportPolicyArguments"
        if not 0.0 <= self.weight <= 1.0:  # also NaN
            raise ValueError(f"{name}.weight must be in [0, 1], got {self.weight!r}")
        if not Path(self.run_dir).expanduser().is_dir():
            raise ValueError(f"{name}.run_dir: {self.run_dir} is not a directory")
        if Path(self.output_dir).expanduser().resolve() == Path(self.run_dir).expanduser().resolve():
            raise ValueError(f"{name}.output_dir must differ from run_dir (the run's adapters are kept)")


def run_export_policy(args: ExportPolicyArguments) -> Path:
    """CLI entry point: write ``args.output_dir``, the run's trained adapter interpolated toward its start."""
    run_dir = Path(args.run_dir).expanduser()
    kept = run_dir / TRAINED_POLICY_DIR
    trained = kept if kept.is_dir() else run_dir
    if trained == run_dir and (run_dir / INTERPOLATION_FILE).is_file():
        raise ModelLoadError(
            f"ExportPolicyArguments.run_dir: {run_dir} holds an exported interpolation without its trained adapter "
            f"(no {TRAINED_POLICY_DIR}/); pass the run's own output_dir"
        )
    start = args.start
    if start is None:
        record_file = run_dir / INTERPOLATION_FILE
        if not record_file.is_file():
            raise ModelLoadError(
                f"ExportPolicyArguments.start: {run_dir} records no start ({INTERPOLATION_FILE} is missing: the run "
                "exported its trained adapter as is); pass --start ADAPTER_DIR, or --start none for a fresh-LoRA "
                "start"
            )
        try:
            start = json.loads(record_file.read_text())["start"]
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{record_file}: no 'start' entry ({err})") from err
    elif start.lower() == "none":
        start = None
    if start is not None and not Path(start).expanduser().is_dir():
        raise ModelLoadError(f"ExportPolicyArguments.start: {start} is not a directory")
    out = interpolate_adapter(
        trained, None if start is None else Path(start).expanduser(), args.weight, args.output_dir
    )
    logger.info(
        "Exported %s: %.3g x the trained change of %s + %.3g x %s",
        out,
        args.weight,
        trained,
        1 - args.weight,
        f"the adapter of {start}" if start is not None else "the base model",
    )
    return out
