"""The guidance model of a constrained run and the schedule of its rounds, built from a ``ConstrainedConfig``.

:func:`build_guidance` makes the :class:`~steer.guidance.GuidanceModel` on the policy (started from the
oracle's priors), the :class:`~steer.trainers.schedule.GuidanceLearner` that trains it and the schedule that
runs its rounds: ``sequential`` (in place), ``parallel`` (a thread on a copy of the policy made before the
guidance adapter exists) or ``process`` (a worker process; the copy shares the frozen base tensors). Under
several processes the guidance gradients are averaged (sequential) or the swapped-in weights are (the others).
"""

from __future__ import annotations

import copy

import torch
from accelerate.utils import is_peft_model

from steer.constraints import Constraint
from steer.guidance import GuidanceModel
from steer.guidance.oracle_priors import OraclePriors

from . import sharding
from .process_schedule import ProcessSchedule, worker_copy
from .schedule import GuidanceLearner, ParallelSchedule, SequentialSchedule, copy_tensors, isolated_rng

__all__ = ["build_guidance", "prompts_from"]


def build_guidance(
    policy,
    args,
    *,
    tokenizer,
    constraint: Constraint,
    prompts: list[str],
    priors: OraclePriors,
    process_index: int = 0,
    num_processes: int = 1,
):
    """``(guidance, schedule, pad_token_id)`` for ``policy`` and ``args`` (a ``ConstrainedConfig``).

    Runs on its own seeded RNG (``args.seed + 17``), so the global RNG streams are left as they were.
    """
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    with isolated_rng(args.seed + 17):
        worker_policy = None
        if args.schedule == "parallel":
            # The worker's own model: a copy made before any guidance adapter exists on the policy.
            worker_policy = copy.deepcopy(policy)
            _unpatch_forward(worker_policy)
        elif args.schedule == "process":
            # The same, its frozen base tensors shared with the policy (one physical copy once shipped).
            worker_policy = worker_copy(policy)
            _unpatch_forward(worker_policy)
        with sharding.zero3_gathered(policy.parameters()):  # ZeRO-3: weights partitioned at load
            guidance = GuidanceModel(policy, args.guidance_config())
        guidance.set_trainable(False)
        priors.apply(guidance)
        common = dict(
            tokenizer=tokenizer,
            constraint=constraint,
            prompts=prompts,
            settings=args.round_settings(),
            lr=args.guidance_lr,
            seed=args.seed,
            buffer_size=args.sample_buffer_size,
            process_index=process_index,
            flagged=priors.flagged,
            label_rows=priors.label_rows,
            # None (not False) unless the user turned bars off: TrainingArguments fills an unset disable_tqdm with False,
            # which would override STEER_NO_PROGRESS / TQDM_DISABLE (steer.progress decides for None)
            disable_tqdm=True if args.disable_tqdm else None,
        )
        if worker_policy is None:
            grad_sync = sharding.average_gradients if num_processes > 1 else None
            learner = GuidanceLearner(policy, guidance, grad_sync=grad_sync, **common)
            return guidance, SequentialSchedule(learner), learner.pad_token_id
        worker_guidance = GuidanceModel(worker_policy, args.guidance_config())
        worker_guidance.set_trainable(False)
        worker_guidance.set_context_prior(priors.context)
        copy_tensors(worker_guidance.trainable_parameters(), guidance.trainable_parameters())
        names = sorted(trainable)
        background = dict(
            policy_params=lambda: _params(policy, names),
            guidance_params=guidance.trainable_parameters,
            synchronised=args.parallel_synchronised,
            wait_warmup=args.guidance_warmup_wait,
            worker_threads=args.parallel_worker_threads,
            sync_weights=sharding.average_weights if num_processes > 1 else None,
        )
        if args.schedule == "process":
            learner = GuidanceLearner(worker_policy, worker_guidance, **common)
            schedule = ProcessSchedule(
                learner,
                policy_names=names,
                device=args.guidance_process_device,
                timeout=args.guidance_process_timeout,
                **background,
            )
        else:
            worker_tokenizer = copy.deepcopy(tokenizer)  # fast tokenizers are not thread-safe
            learner = GuidanceLearner(
                worker_policy, worker_guidance, **{**common, "tokenizer": worker_tokenizer}
            )
            schedule = ParallelSchedule(
                learner, worker_policy_params=lambda: _params(worker_policy, names), **background
            )
        return guidance, schedule, learner.pad_token_id


def prompts_from(prompt_dataset, tokenizer) -> list[str]:
    """The prompts the rounds sample from: a dataset with a ``prompt`` column (text, or chat messages rendered with
    the chat template) or a list of strings."""
    if prompt_dataset is None:
        raise ValueError("ConstrainedTrainer needs prompt_dataset= (a dataset with a 'prompt' column)")
    if isinstance(prompt_dataset, (list, tuple)):
        values = list(prompt_dataset)
    else:
        columns = list(getattr(prompt_dataset, "column_names", None) or [])
        if "prompt" not in columns:
            raise ValueError(f"prompt_dataset has no 'prompt' column (found columns: {columns})")
        values = list(prompt_dataset["prompt"])
    prompts = []
    for i, value in enumerate(values):
        if isinstance(value, str):
            prompts.append(value)
        elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
            prompts.append(tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True))
        else:
            raise ValueError(
                f"prompt_dataset['prompt'][{i}] must be a string or a list of chat messages, got {type(value).__name__}"
            )
    if not prompts:
        raise ValueError("prompt_dataset is empty")
    return prompts


def _unpatch_forward(model) -> None:
    """Drop TRL's instance-level fused-head ``forward`` from a deep copy (its closure calls the original)."""
    inner = model.get_base_model() if is_peft_model(model) else model
    inner.__dict__.pop("forward", None)


def _params(model, names: list[str]) -> list[torch.Tensor]:
    """The named parameters of ``model``, looked up afresh (loading a checkpoint may replace tensors)."""
    named = dict(model.named_parameters())
    return [named[n] for n in names]
