"""Where a ``steer`` command runs: accelerator detection, CPU defaults, and the launch environment of CPU ranks.

On a machine without an accelerator the CLI makes TrainingArguments CPU-safe (``use_cpu``, no bf16), makes a
multi-rank launch use gloo on CPU (DDP) or keeps DeepSpeed on CPU ranks, and refuses a GPU DeepSpeed config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

from steer.cli.commands import CommandLineError

# Defaults that replace TrainingArguments' own on a machine without an accelerator (YAML and flags still win):
# SFTConfig defaults to bf16=True, which TrainingArguments rejects without a GPU unless use_cpu is set.
CPU_DEFAULTS = {"use_cpu": True, "bf16": False}
# A DeepSpeed launch on CPU ranks: accelerate runs DeepSpeed only when use_cpu is off, and needs a backend
# (gloo) to set up the process group; DeepSpeed itself needs DS_ACCELERATOR=cpu (set by the launch below).
DEEPSPEED_CPU_DEFAULTS = {"use_cpu": False, "bf16": False, "ddp_backend": "gloo"}

_TRUE = ("1", "true", "yes", "on")


def accelerator_available() -> bool:
    import torch

    accel = getattr(torch, "accelerator", None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def deepspeed_requested() -> bool:
    from steer.trainers.sharding import deepspeed_requested as requested  # (torch is imported by then anyway)

    return requested()


def cpu_parser_defaults(dests: Collection[str]) -> dict[str, object]:
    """The parser defaults to set for a command whose parser has the keys ``dests`` (empty with an accelerator)."""
    if not (CPU_DEFAULTS.keys() <= set(dests)) or accelerator_available():
        return {}
    defaults = DEEPSPEED_CPU_DEFAULTS if deepspeed_requested() else CPU_DEFAULTS
    return {k: v for k, v in defaults.items() if k in dests}


def use_cpu_when_no_accelerator(available: Callable[[], bool] = accelerator_available) -> None:
    """Launched with several ranks on a machine without an accelerator -> make accelerate use gloo on CPU.

    Without it ``TrainingArguments(use_cpu=False)`` leaves each rank with ``DistributedType.NO`` (every rank
    trains alone on the full data) although torch.distributed is up. Setting ``use_cpu: true`` in the
    recipe does the same explicitly. ``available`` tells whether an accelerator is present.
    """
    check_gpu_launch_config(available)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "ACCELERATE_USE_CPU" in os.environ:
        return
    if not available():
        if deepspeed_requested():  # DeepSpeed on CPU ranks (see DEEPSPEED_CPU_DEFAULTS)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            return
        os.environ["ACCELERATE_USE_CPU"] = "true"


def check_gpu_launch_config(available: Callable[[], bool] = accelerator_available) -> None:
    """A GPU DeepSpeed config (``mixed_precision: bf16``/``fp16``) launched on a machine without an accelerator
    fails on every rank once its model has loaded; refuse it at once, pointing at the ``*_cpu.yaml`` configs."""
    flag = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower()
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if flag not in _TRUE or precision not in ("bf16", "fp16") or available():
        return
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    cpu_config = f"accelerate_configs/zero{stage}_cpu.yaml" if stage in ("2", "3") else "a *_cpu.yaml config"
    raise CommandLineError(
        "",
        f"the accelerate config asks for DeepSpeed with mixed_precision={precision}, a GPU setting, but this "
        f"machine has no accelerator; launch with {cpu_config} (accelerate_configs/*_cpu.yaml: the same settings "
        "on CPU ranks, fp32)",
    )


def quiet_cpu_accelerator() -> None:
    """On a machine without an accelerator, tell DeepSpeed so (``DS_ACCELERATOR=cpu``): it would otherwise
    warn "Setting accelerator to CPU" whenever a library imports it, on every command."""
    if "DS_ACCELERATOR" not in os.environ and not accelerator_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
