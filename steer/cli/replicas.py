"""After a multi-process run: a digest of the trained weights on every rank, and a warning when ranks disagree.

A trainer names the modules it trains with ``trained_modules()`` (e.g. the policy and its guidance model);
otherwise its ``model`` is digested.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

from steer.cli.commands import Command

logger = logging.getLogger("steer.cli")

SHARDED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
MAX_DIGEST_VALUES = 500_000_000  # skip the check for huge full fine-tunes (hashing would take minutes)


def parameter_digest(modules: Iterable[Any], *, max_values: int | None = None) -> tuple[str, int]:
    """SHA-256 over the trained weights of ``modules`` (fp32 bytes, fixed order); returns (hex, #values).

    For an ``nn.Module``: its parameters that require grad or belong to an adapter (``lora_``), sorted by
    name. For an object with ``trainable_parameters()`` (the guidance model, whose parameters are frozen
    between rounds): exactly those. Used after distributed training to check that all ranks agree.
    Returns ``("", 0)`` when there are more than ``max_values`` values. FSDP2-sharded parameters (``DTensor``)
    and DeepSpeed ZeRO-3 partitions are gathered first, so there it is a collective: every rank calls it with
    the same modules.
    """
    import torch
    from torch.distributed.tensor import DTensor

    groups = []
    for module in modules:
        if module is None:
            continue
        module = getattr(module, "module", module)  # DDP wrapper
        if callable(getattr(module, "trainable_parameters", None)):
            named = [(str(i), p) for i, p in enumerate(module.trainable_parameters())]
        else:
            named = sorted(
                ((n, p) for n, p in module.named_parameters() if p.requires_grad or _is_adapter(n)),
                key=lambda item: item[0],
            )
        groups.append(named)
    total = sum(int(getattr(p, "ds_numel", p.numel())) for named in groups for _, p in named)
    if max_values is not None and total > max_values:
        return "", 0
    digest = hashlib.sha256()
    count = 0
    for index, named in enumerate(groups):
        for name, param in named:
            shape = tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition's full shape
            digest.update(f"{index}:{name}:{shape}".encode())
            value = param.detach()
            if isinstance(value, DTensor):  # FSDP2 shard: digest the whole value (an all-gather)
                value = value.full_tensor()
            elif hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 partition: gather it (a collective)
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    value = param.detach().clone()
            digest.update(value.to("cpu", torch.float32).contiguous().numpy().tobytes())
            count += int(getattr(param, "ds_numel", param.numel()))
    return digest.hexdigest(), count


def _is_adapter(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def result_modules(result: Any) -> list[Any]:
    """The trained modules behind an entry point's result: a model itself, the trainer's ``trained_modules()``
    where it has one, else the trainer's ``model``."""
    import torch

    if isinstance(result, torch.nn.Module):
        return [result]
    trained = getattr(result, "trained_modules", None)
    if callable(trained):
        return [module for module in trained() if module is not None]
    model = getattr(result, "model", None)
    return [model] if isinstance(model, torch.nn.Module) else []


def log_replica_digest(command: Command, training_args, result: Any) -> None:
    """Log a digest of the trained weights on every rank and warn when the ranks disagree."""
    modules = result_modules(result)
    if not modules:
        return
    # the trainer's AcceleratorState knows FSDP (training_args.distributed_state, a PartialState, does not)
    state = getattr(getattr(result, "accelerator", None), "state", None) or training_args.distributed_state
    kind = str(getattr(state.distributed_type, "value", ""))
    # Megatron: each rank holds only its shard, local digests differ; FSDP (steer's trainers run FSDP2 only) and
    # DeepSpeed: parameter_digest gathers the shards, so every rank digests the full weights
    if kind in SHARDED_TYPES and kind not in ("FSDP", "DEEPSPEED"):
        return
    digest, count = parameter_digest(modules, max_values=MAX_DIGEST_VALUES)
    if not count:
        return
    logger.info(
        "%s: rank %d/%d trained-parameter digest %s (%d values)",
        command.name,
        training_args.process_index,
        training_args.world_size,
        digest,
        count,
    )
    if training_args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            digests: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                logger.warning("%s: ranks ended with DIFFERENT weights: %s", command.name, digests)
            elif training_args.process_index == 0:
                logger.info("%s: all %d ranks hold identical trained weights", command.name, len(digests))
