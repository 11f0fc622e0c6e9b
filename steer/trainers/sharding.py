"""FSDP2 and DeepSpeed support shared by the trainers: CPU ranks, full weights in and out of sharded parameters.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what ``accelerate_configs/fsdp2*.yaml`` select) every
parameter of a shard unit is a ``DTensor`` holding 1/world of the values; the unit all-gathers them in its
forward pre-hook and frees them again after the forward. Anything that reads a parameter *outside* the
wrapped module's forward (exporting, copying weights, a digest) must gather it explicitly: the helpers here
are those explicit steps. Every helper that gathers or scatters is a collective: all ranks call it, in the
same order. :func:`zero3_gathered` and :func:`zero3_whole` are the same explicit steps for DeepSpeed ZeRO-3.

:func:`promote_cpu_fsdp` exists because accelerate 1.15 silently ignores FSDP when the ranks run on CPU
(``AcceleratorState`` switches to FSDP only for GPU-like distributed types, so a CPU run with an FSDP config
trains as plain DDP over gloo). torch's FSDP2 itself runs on CPU over gloo, so the trainers promote the
state to FSDP there, with the plugin accelerate's launcher described in the environment (``FSDP_*``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "average_gradients",
    "average_weights",
    "check_accelerator",
    "full_state_dict",
    "deepspeed_requested",
    "fsdp_units",
    "full_tensor",
    "is_fsdp",
    "is_zero3",
    "load_full_state_dict",
    "promote_cpu_fsdp",
    "refuse_cpu_deepspeed",
    "replicate_guidance",
    "require_fsdp2",
    "unsharded",
    "whole_model",
    "zero3_gathered",
    "zero3_whole",
]


def _launcher_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _fsdp_requested() -> bool:
    return _launcher_flag("ACCELERATE_USE_FSDP")


def deepspeed_requested() -> bool:
    """The launcher's accelerate config asked for DeepSpeed (``distributed_type: DEEPSPEED``)."""
    return _launcher_flag("ACCELERATE_USE_DEEPSPEED")


def promote_cpu_fsdp(accelerator) -> bool:
    """Make ``accelerator`` run FSDP2 on CPU ranks when the launcher asked for FSDP; True when it changed.

    accelerate's launcher sets ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables for an FSDP config, but
    with ``use_cpu`` (gloo) its state stays ``MULTI_CPU`` and the model would be wrapped in DDP. Here the
    (shared) ``AcceleratorState`` and ``PartialState`` are switched to ``DistributedType.FSDP`` (gloo, CPU
    devices and the process group stay as set up) with a plugin built from those variables. Only FSDP2
    (``fsdp_version: 2``) is supported on CPU.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not _fsdp_requested():
        return False
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserInputError(
            f"FSDP on CPU ranks needs FSDP2 (fsdp_version: 2 in the accelerate config), got fsdp_version="
            f"{plugin.fsdp_version}; see accelerate_configs/fsdp2_cpu.yaml"
        )
    # Both singletons: every later ``AcceleratorState()`` re-copies PartialState's fields over its own, which
    # would silently turn the run back into MULTI_CPU (and ``accelerator.is_fsdp2`` false) mid-training.
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    logger.info("FSDP2 on CPU ranks (gloo): accelerate's MULTI_CPU state promoted to FSDP")
    return True


def refuse_cpu_deepspeed(accelerator) -> None:
    """Raise when the launcher asked for DeepSpeed but the ranks run with ``use_cpu`` (accelerate drops it silently).

    accelerate 1.15 enables DeepSpeed only when ``use_cpu`` is off: with ``use_cpu`` (gloo) a ZeRO config trains
    as plain DDP without a word. With ``use_cpu: false``, ``ddp_backend: gloo`` and ``DS_ACCELERATOR=cpu`` (what
    steer's CLI defaults to for a DeepSpeed launch on a machine without an accelerator) DeepSpeed runs ZeRO on the
    CPU ranks (``accelerate_configs/zero3_cpu.yaml``).
    """
    from accelerate.utils import DistributedType

    if deepspeed_requested() and accelerator.state.distributed_type == DistributedType.MULTI_CPU:
        raise UserInputError(
            "DeepSpeed was requested (accelerate config with distributed_type: DEEPSPEED) but use_cpu is set, "
            "with which accelerate 1.15 silently falls back to DDP; drop use_cpu from the recipe (or set it to "
            "false: steer then uses gloo and DS_ACCELERATOR=cpu, see accelerate_configs/zero3_cpu.yaml), or "
            "launch with accelerate_configs/fsdp2_cpu.yaml (sharded) or accelerate_configs/multi_cpu.yaml (DDP)"
        )


def is_fsdp(accelerator) -> bool:
    """True when ``accelerator`` shards the model with FSDP (either version)."""
    return (
        getattr(accelerator, "is_fsdp2", False) or getattr(accelerator.state, "fsdp_plugin", None) is not None
    )


def require_fsdp2(accelerator, trainer_name: str) -> None:
    """Raise a one-line error when ``accelerator`` runs FSDP1 (steer's trainers support FSDP2 only)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and plugin.fsdp_version != 2:
        raise UserInputError(
            f"{trainer_name} supports FSDP2 only (fsdp_version: 2 in the accelerate config), got fsdp_version="
            f"{plugin.fsdp_version}"
        )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor: ``DTensor.full_tensor()`` (an all-gather) or itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``{name: full value}`` of ``module``'s parameters (all, or ``names``), detached, on CPU. Collective."""
    params = dict(module.named_parameters())
    wanted = sorted(params) if names is None else list(names)
    return {name: full_tensor(params[name].detach()).to("cpu").clone() for name in wanted}


def load_full_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy full values into ``module``'s (possibly sharded) parameters, in place, without communication.

    Every rank holds the same ``state`` (e.g. read from a checkpoint): a sharded parameter keeps its own
    slice (``distribute_tensor(..., src_data_rank=None)`` slices locally), a plain one takes the whole value.
    Raises ``KeyError``/``ValueError`` on an unknown name or a shape mismatch.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name not in params:
                raise KeyError(f"{type(module).__name__} has no parameter {name!r}")
            param = params[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
            if isinstance(param, DTensor):
                value = value.to(param.to_local().device, param.dtype)
                local = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(local.to_local())
            else:
                param.copy_(value.to(param.device, param.dtype))


def broadcast_module(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and persistent buffers of ``module`` (in place). Collective.

    Meant for a model not yet placed (FSDP2 moves what it shards): ranks whose copy was created without
    weights (``meta`` tensors, as transformers does on ranks > 0 when ``FSDP_CPU_RAM_EFFICIENT_LOADING`` is
    set) get real storage on CPU first, like rank 0's; tied weights are re-tied.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers()):
        module.to_empty(device="cpu")
        if callable(getattr(module, "tie_weights", None)):
            module.tie_weights()
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            # CPU tensors (a model not yet placed: FSDP moves it when sharding) over gloo, also on NCCL ranks
            cpu_group = tensor.device.type == "cpu" and dist.get_backend() != "gloo"
            dist.broadcast(tensor.data, src=0, group=_cpu_group() if cpu_group else None)


_CPU_GROUP = None


def _cpu_group():
    """A gloo group over all ranks for CPU tensors (created once; a collective)."""
    global _CPU_GROUP
    import torch.distributed as dist

    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 shard units inside ``module`` (itself included), outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(module: nn.Module):
    """Hold every FSDP2 unit of ``module`` unsharded (full, plain parameters) inside the block. Collective.

    For work outside the wrapped forward that calls submodules directly or in a data-dependent number of
    forwards (sampling with ``generate``, a second adapter's passes): one all-gather per unit on entry, none
    inside (the units neither reshard after forward nor after backward there), one free on exit. Every rank
    enters and leaves the block together. Gradients of sharded parameters computed inside the block are not
    reduced: only train plain (replicated) parameters in it. No-op without FSDP2 units.
    """
    units = fsdp_units(module)
    if not units:
        yield
        return
    # FSDP2 makes the first unit to run a forward the root: settle it on the outermost unit first (a unit
    # called directly inside the block before the root's first forward would otherwise claim the role).
    units[0]._get_fsdp_state()._lazy_init()
    saved = []  # each unit's reshard settings, put back on exit
    for unit in units:
        state = unit._get_fsdp_state()
        groups = [(g.post_forward_mesh_info, g.reshard_after_backward) for g in state._fsdp_param_groups]
        saved.append((getattr(state, "_auto_reshard_after_forward", None), groups))
        unit.set_reshard_after_forward(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, (auto, groups) in zip(units, saved):
            state = unit._get_fsdp_state()
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for group, (mesh_info, after_backward) in zip(state._fsdp_param_groups, groups):
                group.post_forward_mesh_info = mesh_info
                group.reshard_after_backward = after_backward
            unit.reshard()


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3
def is_zero3(accelerator) -> bool:
    """True when ``accelerator`` runs DeepSpeed ZeRO stage 3 (partitioned parameters)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def _partitioned(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if hasattr(p, "ds_id")]


@contextlib.contextmanager
def zero3_gathered(params: Iterable[torch.Tensor], *, modifier_rank: int | None = None):
    """The ZeRO-3 partitioned ones among ``params`` whole inside the block (``deepspeed.zero.GatheredParameters``).

    ``modifier_rank``: the rank whose in-place changes are kept (re-partitioned) on exit; ``None``: read only.
    Collective: every rank enters with the same parameters. No-op when none is partitioned.
    """
    params = _partitioned(params)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def zero3_whole(engine, *, modifier_rank: int | None = None):
    """Every parameter of a ZeRO-3 ``engine``'s module whole inside the block, and DeepSpeed's per-module hooks off.

    For work outside the engine's forward that runs a rank-dependent number of forwards (sampling with
    ``generate``, guidance batches) or reads weights directly (the fused KL's output head): ZeRO-3 all-gathers
    in a hook around every submodule's forward, also inside ``GatheredParameters``, so ranks running different
    numbers of forwards would wait on each other forever. Inside the block the hooks are removed (DeepSpeed's
    ``DeepSpeedZeRoOffload._remove_module_hooks``, a private API checked with DeepSpeed 0.19.8) and put back on
    exit. Gradients of partitioned parameters computed inside the block are not reduced by DeepSpeed: train
    only parameters whose gradients the caller reduces itself, and keep their changes with ``modifier_rank``.
    Collective. The block holds the full model in memory.
    """
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None or not hasattr(offload, "_remove_module_hooks"):
        raise RuntimeError(
            "zero3_whole needs a DeepSpeed ZeRO-3 engine whose optimizer has parameter_offload "
            "(checked with DeepSpeed 0.19.8)"
        )
    from deepspeed.runtime.zero import parameter_offload

    with zero3_gathered(engine.module.parameters(), modifier_rank=modifier_rank):
        offload._remove_module_hooks()
        stack = parameter_offload.FWD_MODULE_STACK
        depth = len(stack)
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
            del stack[
                depth:
            ]  # setting the hooks up again pushes the module once more: keep the stack as it was


# ---------------------------------------------------------------------------------------------- trainers' set-up
def check_accelerator(accelerator, trainer_name: str) -> bool:
    """What a trainer checks once its accelerator exists: DeepSpeed on CPU refused in one line, FSDP on CPU ranks
    promoted (see :func:`promote_cpu_fsdp`), FSDP1 refused. Returns whether FSDP was promoted."""
    refuse_cpu_deepspeed(accelerator)
    promoted = promote_cpu_fsdp(accelerator)
    if is_fsdp(accelerator):
        require_fsdp2(accelerator, trainer_name)
    return promoted


def whole_model(model: nn.Module, engine, *, fsdp: bool, zero3: bool, modifier_rank: int | None = None):
    """``model``'s weights whole for work outside its forward: FSDP2 units unsharded (:func:`unsharded`), or
    (ZeRO-3) every parameter of ``engine`` gathered with DeepSpeed's module hooks off (:func:`zero3_whole`;
    ``modifier_rank``: whose changes are kept). A no-op otherwise. Collective."""
    if fsdp:
        return unsharded(model)
    if zero3:
        return zero3_whole(engine, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def replicate_guidance(accelerator, model: nn.Module, guidance: nn.Module, device) -> None:
    """FSDP2: keep the guidance model's trained weights replicated beside the sharded policy.

    The policy (base weights + policy LoRA) is sharded: each decoder layer, the input embedding and the output
    head are their own units, the rest belongs to the root (the PEFT model). The guidance weights (its LoRA
    adapter on the same base, or its own backbone, and its head) become FSDP2 ``ignored_params``: they train in
    the guidance rounds, outside the policy's forward, with their own optimizer and an explicit gradient
    all-reduce, exactly as under DDP. accelerate's rank-0-loads path (meta device + broadcast into shards)
    cannot hold replicated weights, and FSDP2 (unlike DDP) does not sync initial weights: every rank takes rank
    0's policy and guidance model here.
    """
    plugin = accelerator.state.fsdp_plugin
    ignored = [guidance.head]
    if guidance.backbone is not None:
        ignored.append(guidance.backbone)
    else:
        name = guidance.config.adapter_name
        ignored += [
            module
            for path, module in model.named_modules()
            if path.split(".")[-1] == name and path.split(".")[-2:-1] in (["lora_A"], ["lora_B"])
        ]
    plugin.ignored_modules = ignored
    plugin.cpu_ram_efficient_loading = False
    broadcast_module(model)
    broadcast_module(guidance)
    for module in ignored:  # FSDP2 places what it shards, not the replicated guidance weights
        module.to(device)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the processes (a missing gradient counts as zeros; a frozen
    parameter, frozen on every process alike, is skipped). Collective."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for param in params:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad.div_(world)


def average_weights(params: Iterable[torch.Tensor]) -> None:
    """Average the values of ``params`` over the processes, in place. Collective."""
    import torch.distributed as dist

    world = dist.get_world_size()
    with torch.no_grad():
        for param in params:
            dist.all_reduce(param.data)
            param.data.div_(world)
