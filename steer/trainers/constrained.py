"""Constrained fine-tuning: SFT on a corpus + λ·KL(q* || p_θ) towards the NADO-guided distribution.

``ConstrainedTrainer`` is TRL's ``SFTTrainer`` with one extra loss term and guidance rounds:

    loss = SFT(corpus) + kl_coef * KL(q* || p_θ)   on the same supervised positions SFT uses,

where ``log q* = log_softmax(ref + logsigmoid(z))``, ``ref`` is the detached policy (``kl_reference="policy"``)
or the frozen base (``"base"``), and ``z`` comes from a guidance model trained, every ``guidance_interval``
optimizer steps, on policy samples labelled by a :class:`~steer.constraints.Constraint`
(see :mod:`steer.trainers.schedule`). The KL is summed over positions and divided by the same token
count as the SFT loss (``num_items_in_batch``), so it is correct under gradient accumulation.

How the pieces share one forward: a forward hook on the decoder body keeps its last hidden states. With
``kl_implementation="fused"`` (default) the policy's forward stops at the body (``logits_to_keep=1``) and one
call of :func:`~steer.guidance.fused_constraint_kl` does the rest from those hidden states and the no-grad
guidance pass's: a chunk of positions at a time the LM head, the SFT NLL (and TRL's entropy / token-accuracy
metrics), the guidance head, q*, the KL and their gradients, never a ``[N, V]`` tensor, the head computed once
for the SFT loss and every KL position set (corpus, samples). Where TRL's own loss is needed (label smoothing,
``loss_type`` other than 'nll', a ``compute_loss_func``, MoE aux loss, sequence/context parallelism, a model
without ``logits_to_keep``) TRL's fused LM head computes the SFT loss and the fused KL runs after it. With
``"chunked"`` (the reference) TRL computes the SFT loss, the policy logits and ``z`` at the counted positions are
materialised (``[N, V]``) and :func:`~steer.guidance.constraint_kl` runs on them.

Under several processes (DDP): the guidance parameters have ``requires_grad=False`` whenever the policy
steps (so DDP never sees them); guidance rounds run outside DDP on every rank with rank-specific samples,
and the guidance gradients are all-reduced (sequential schedule) or the swapped-in guidance weights are
averaged on the main thread (parallel and process schedules: the worker never runs collectives; with
``schedule="process"`` every rank owns one worker process). Checkpoints hold one
``constrained_state_rank{i}.pt`` per rank (each rank's sample buffer).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from steer.constraints import Constraint
from steer.errors import UserInputError
from steer.guidance import (
    GuidanceConfig,
    GuidanceModel,
    constraint_kl,
    fused_chunk_size,
    fused_constraint_kl,
)
from steer.guidance.context_prior import context_prior, lexicon
from steer.guidance.prior import prior_logits, token_prior
from steer.io import atomic_dir, atomic_torch_save

from . import sharding
from .buffer import SampleBuffer
from .curves import CurvesCallback
from .process_schedule import ProcessSchedule, worker_copy
from .schedule import GuidanceLearner, ParallelSchedule, RoundSettings, SequentialSchedule, round_seed

logger = logging.getLogger(__name__)

__all__ = ["ConstrainedConfig", "ConstrainedTrainer"]

STATE_NAME = "constrained_state.pt"
GUIDANCE_DIR = "guidance"
ROUND_METRICS = (
    "guidance/loss",
    "guidance/auc",
    "guidance/auc_samples",
    "guidance/r_separation",
    "constraint/satisfaction",
    "constraint/violations",
    "samples_per_second",
    "guidance/samples_dropped",
    "guidance/buffer_size",
)


def _choice(name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"ConstrainedConfig.{name} must be one of {list(options)}, got {value!r}")


def _at_least(name: str, value: Any, low: float, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"ConstrainedConfig.{name} must be {'>' if strict else '>='} {low}, got {value!r}")


@dataclass
class ConstrainedConfig(SFTConfig):
    """``SFTConfig`` + the constraint term, the guidance model and its training rounds.

    Every field has ``help`` metadata (``steer train constrained --help`` lists them) and is validated in
    ``__post_init__`` with an error that names it.
    """

    kl_coef: float = field(
        default=1.0,
        metadata={
            "help": "λ: weight of KL(q* || p_theta) added to the SFT loss (>= 0). 0 = the plain-SFT baseline: no "
            "guidance rounds, every other setting identical."
        },
    )
    kl_reference: str = field(
        default="policy",
        metadata={
            "help": "Reference distribution inside q*: 'policy' (the current policy, detached; no extra forward) "
            "or 'base' (the frozen base model with adapters disabled; needs a PEFT policy)."
        },
    )
    kl_chunk_size: int = field(
        default=256,
        metadata={
            "help": "Positions per chunk in the vocabulary-wide KL (bounds its extra memory). 'fused' uses at most "
            "this many: all N counted positions at once when one [N, vocab] fp32 tensor fits in 64 MiB, else about "
            "N/16 (at least 16)."
        },
    )
    kl_implementation: str = field(
        default="fused",
        metadata={
            "help": "How the KL term is computed: 'fused' (from the hidden states: LM head, guidance head, q*, KL "
            "and gradients a chunk of positions at a time, never a [tokens, vocab] tensor; the SFT NLL comes out "
            "of the same head pass unless TRL's own loss is needed, e.g. label smoothing) or 'chunked' (TRL "
            "computes the SFT loss, then the policy logits and z at the counted positions are materialised; the "
            "reference implementation). 'fused' falls back to 'chunked' when the output head is adapted (not a "
            "plain nn.Linear)."
        },
    )
    kl_positions: str = field(
        default="both",
        metadata={
            "help": "Where the KL acts: 'corpus' (the supervised positions of the training batch), 'samples' "
            "(the continuation positions of the newest round's policy samples, appended to each batch: where "
            "the policy generates) or 'both'."
        },
    )
    kl_corpus_stop_at_violation: bool = field(
        default=True,
        metadata={
            "help": "Corpus positions: drop every position after the first target token that the oracle flags on "
            "its own (token prior < label_threshold): past a violation the constraint is lost and R carries no signal."
        },
    )
    kl_sample_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the KL on the policy-sample positions (default: kl_coef). The corpus positions are "
            "anchored by the SFT loss, the samples are not: there q* = p_theta * R is re-applied to the policy at "
            "every step, so a smaller weight here trades some detox for less drift on clean text. 0 = no samples."
        },
    )
    kl_sample_batch_size: int = field(
        default=8,
        metadata={
            "help": "Policy samples appended to each training micro-batch when kl_positions uses samples."
        },
    )
    guidance_backbone: str = field(
        default="lora",
        metadata={
            "help": "Guidance model backbone: 'lora' (a second LoRA adapter on the policy's frozen base weights; "
            "needs a PEFT policy) or 'separate' (a copy of the base's first guidance_num_layers layers)."
        },
    )
    guidance_lora_r: int = field(default=16, metadata={"help": "LoRA rank of the guidance adapter."})
    guidance_lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the guidance adapter."})
    guidance_num_layers: int | None = field(
        default=None, metadata={"help": "'separate' backbone: number of base layers to copy (None: all)."}
    )
    guidance_lr: float = field(
        default=5e-4, metadata={"help": "Learning rate of the guidance model's AdamW."}
    )
    guidance_prior: str = field(
        default="token",
        metadata={
            "help": "How the guidance head starts: 'token' (bias = the oracle's score of each vocabulary token's own "
            "text, cached per oracle + tokenizer, so tokens never sampled still carry the oracle's judgement), "
            "'label_mean' (every token at the warm-up round's satisfaction rate) or 'none' (R = 0.5)."
        },
    )
    guidance_prior_floor: float = field(
        default=0.02,
        metadata={
            "help": "The token prior is clipped to [floor, 1 - floor] before its logit becomes the head bias."
        },
    )
    guidance_context_prior: str = field(
        default="none",
        metadata={
            "help": "'corpus': also score the words of the training texts and prompts with the oracle, and for each "
            "flagged word the tokenizer splits (SmolLM2: ' fuck' = ' f' + 'uck') set z of its completing token after "
            "its leading tokens (fixed offsets on top of the token prior, cached; steer.guidance.context_prior). "
            "The corpus KL then also stops at such a completion. Needs guidance_prior='token'. 'none': off."
        },
    )
    guidance_context_texts: int = field(
        default=20000,
        metadata={
            "help": "How many training rows (besides every prompt) the context prior's words are read from."
        },
    )
    guidance_prior_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where token priors are cached (default: $STEER_CACHE/priors)."},
    )
    guidance_warmup_samples: int | None = field(
        default=None,
        metadata={
            "help": "Policy samples of the warm-up round (round 0), sized for a first AUC (default: samples_per_round)."
        },
    )
    guidance_auc_pool: int = field(
        default=256,
        metadata={
            "help": "Held-back samples (never trained on, pooled over rounds, newest kept) on which guidance/auc "
            "is measured each round."
        },
    )
    importance_max_weight: float = field(
        default=5.0,
        metadata={
            "help": "kl_reference='base': guidance samples come from the policy but R must hold under the base, so "
            "each sample is weighted by p_base/p_policy (self-normalised), truncated at this value."
        },
    )
    guidance_steps_per_round: int = field(
        default=8, metadata={"help": "Guidance optimizer steps per round, on sample-buffer minibatches."}
    )
    guidance_batch_size: int = field(default=16, metadata={"help": "Sequences per guidance minibatch."})
    guidance_interval: int = field(
        default=20,
        metadata={
            "help": "Policy optimizer steps between guidance rounds (> 0). A warm-up round runs before step 1."
        },
    )
    guidance_holdout_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Fraction of each round's fresh samples held back from guidance training (into the AUC pool, "
            "see guidance_auc_pool) to measure guidance/auc."
        },
    )
    samples_per_round: int = field(
        default=32, metadata={"help": "Continuations sampled from the policy per round (per process)."}
    )
    sample_max_new_tokens: int = field(
        default=20, metadata={"help": "Maximum length of a sampled continuation."}
    )
    sample_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature for guidance rounds."}
    )
    sample_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus (top-p) truncation for guidance rounds."}
    )
    sample_batch_size: int = field(
        default=16, metadata={"help": "Prompts per generation batch in guidance rounds."}
    )
    label_mode: str = field(
        default="hard",
        metadata={
            "help": "Labels from the constraint: 'hard' (score >= label_threshold) or 'soft' (the score)."
        },
    )
    label_threshold: float = field(
        default=0.5, metadata={"help": "Threshold in [0, 1] for hard labels (and for guidance/auc)."}
    )
    consistency_coef: float = field(
        default=0.0, metadata={"help": "Weight of the guidance consistency regulariser (>= 0; 0 = off)."}
    )
    schedule: str = field(
        default="sequential",
        metadata={
            "help": "'sequential': each round runs before the policy steps that use it. 'parallel': round k+1 "
            "runs in a background thread (own model copy: one extra set of base weights) while the policy "
            "trains with round k's guidance (staleness 1, logged as guidance/staleness). 'process': the same "
            "versions, with rounds in a worker process (own interpreter and, on a GPU, own CUDA context; the "
            "frozen base weights shared with the policy, trainable weights exchanged at every round)."
        },
    )
    parallel_synchronised: bool = field(
        default=False,
        metadata={
            "help": "'parallel'/'process' schedules: wait for every round at once (reproduces 'sequential'; for "
            "tests)."
        },
    )
    parallel_worker_threads: int | None = field(
        default=None,
        metadata={
            "help": "'parallel'/'process' schedules on CPU: intra-op threads of the worker (None: half the "
            "trainer's threads; the trainer keeps the rest while the worker runs)."
        },
    )
    guidance_process_device: str | None = field(
        default=None,
        metadata={
            "help": "'process' schedule: the device the worker computes on (e.g. 'cuda:1'; None: the policy's)."
        },
    )
    guidance_process_timeout: float = field(
        default=3600.0,
        metadata={
            "help": "'process' schedule: seconds to wait for the worker's answer (a round, a state) before "
            "stopping it and failing."
        },
    )
    sample_buffer_size: int = field(
        default=512,
        metadata={"help": "Capacity of the FIFO sample buffer (sequences; oldest dropped first)."},
    )

    def __post_init__(self) -> None:
        # CPU-safe defaults. SFTConfig turns bf16=None into True, which TrainingArguments refuses without a
        # bf16-capable accelerator: keep it off there (an explicit bf16=True still gets TrainingArguments' error).
        if self.bf16 is None and not self.fp16:
            from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

            self.bf16 = not self.use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available())
        # TRL's BaseConfig still defaults the deprecated alias gradient_checkpointing to True: carry it over to
        # activation_checkpointing so that TrainingArguments does not warn about a name the user never set.
        if self.activation_checkpointing is None and self.gradient_checkpointing is True:
            self.activation_checkpointing, self.gradient_checkpointing = True, None
        super().__post_init__()
        _at_least("kl_coef", self.kl_coef, 0.0)
        _choice("kl_reference", self.kl_reference, ("policy", "base"))
        _at_least("kl_chunk_size", self.kl_chunk_size, 1)
        _choice("kl_implementation", self.kl_implementation, ("chunked", "fused"))
        _choice("kl_positions", self.kl_positions, ("corpus", "samples", "both"))
        if self.kl_sample_coef is not None:
            _at_least("kl_sample_coef", self.kl_sample_coef, 0.0)
        _at_least("kl_sample_batch_size", self.kl_sample_batch_size, 1)
        _choice("guidance_prior", self.guidance_prior, ("token", "label_mean", "none"))
        _at_least("guidance_prior_floor", self.guidance_prior_floor, 0.0, strict=True)
        if self.guidance_prior_floor >= 0.5:
            raise ValueError(
                f"ConstrainedConfig.guidance_prior_floor must be in (0, 0.5), got {self.guidance_prior_floor}"
            )
        _choice("guidance_context_prior", self.guidance_context_prior, ("none", "corpus"))
        if self.guidance_context_prior != "none" and self.guidance_prior != "token":
            raise ValueError(
                f"ConstrainedConfig.guidance_context_prior={self.guidance_context_prior!r} adds offsets to the token "
                f"prior's head bias, so it needs guidance_prior='token', got {self.guidance_prior!r}"
            )
        _at_least("guidance_context_texts", self.guidance_context_texts, 1)
        if self.guidance_warmup_samples is not None:
            _at_least("guidance_warmup_samples", self.guidance_warmup_samples, 1)
        _at_least("guidance_auc_pool", self.guidance_auc_pool, 1)
        _at_least("importance_max_weight", self.importance_max_weight, 1.0)
        _choice("guidance_backbone", self.guidance_backbone, ("lora", "separate"))
        _at_least("guidance_lora_r", self.guidance_lora_r, 1)
        _at_least("guidance_lora_alpha", self.guidance_lora_alpha, 0, strict=True)
        if self.guidance_num_layers is not None:
            _at_least("guidance_num_layers", self.guidance_num_layers, 1)
        _at_least("guidance_lr", self.guidance_lr, 0.0, strict=True)
        _at_least("guidance_steps_per_round", self.guidance_steps_per_round, 1)
        _at_least("guidance_batch_size", self.guidance_batch_size, 1)
        _at_least("guidance_interval", self.guidance_interval, 1)
        _at_least("guidance_holdout_fraction", self.guidance_holdout_fraction, 0.0)
        if self.guidance_holdout_fraction >= 1.0:
            raise ValueError(
                f"ConstrainedConfig.guidance_holdout_fraction must be < 1, got {self.guidance_holdout_fraction}"
            )
        _at_least("samples_per_round", self.samples_per_round, 1)
        _at_least("sample_max_new_tokens", self.sample_max_new_tokens, 1)
        _at_least("sample_temperature", self.sample_temperature, 0.0, strict=True)
        _at_least("sample_top_p", self.sample_top_p, 0.0, strict=True)
        if self.sample_top_p > 1.0:
            raise ValueError(f"ConstrainedConfig.sample_top_p must be in (0, 1], got {self.sample_top_p}")
        _at_least("sample_batch_size", self.sample_batch_size, 1)
        _choice("label_mode", self.label_mode, ("hard", "soft"))
        _at_least("label_threshold", self.label_threshold, 0.0)
        if self.label_threshold > 1.0:
            raise ValueError(
                f"ConstrainedConfig.label_threshold must be in [0, 1], got {self.label_threshold}"
            )
        _at_least("consistency_coef", self.consistency_coef, 0.0)
        _choice("schedule", self.schedule, ("sequential", "parallel", "process"))
        _at_least("guidance_process_timeout", self.guidance_process_timeout, 0.0, strict=True)
        if self.parallel_worker_threads is not None:
            _at_least("parallel_worker_threads", self.parallel_worker_threads, 1)
        _at_least("sample_buffer_size", self.sample_buffer_size, 1)
        if self.packing:
            raise ValueError(
                "ConstrainedConfig.packing is not supported: the guidance model scores each sequence on its own"
            )
        if self.padding_free:
            raise ValueError(
                "ConstrainedConfig.padding_free is not supported (the guidance forward needs padding)"
            )

    def round_settings(self) -> RoundSettings:
        return RoundSettings(
            samples_per_round=self.samples_per_round,
            sample_max_new_tokens=self.sample_max_new_tokens,
            sample_temperature=self.sample_temperature,
            sample_top_p=self.sample_top_p,
            sample_batch_size=self.sample_batch_size,
            label_mode=self.label_mode,
            label_threshold=self.label_threshold,
            guidance_steps_per_round=self.guidance_steps_per_round,
            guidance_batch_size=self.guidance_batch_size,
            consistency_coef=self.consistency_coef,
            holdout_fraction=self.guidance_holdout_fraction,
            max_grad_norm=self.max_grad_norm,
            warmup_samples=self.guidance_warmup_samples,
            auc_pool_size=self.guidance_auc_pool,
            prior=self.guidance_prior,
            importance_max_weight=self.importance_max_weight if self.kl_reference == "base" else None,
        )

    def guidance_config(self) -> GuidanceConfig:
        return GuidanceConfig(
            backbone=self.guidance_backbone,
            lora_r=self.guidance_lora_r,
            lora_alpha=self.guidance_lora_alpha,
            separate_num_layers=self.guidance_num_layers,
        )


# --------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _isolated_rng(seed: int):
    """Run a block with its own seeded RNG, leaving the global RNG streams exactly as they were."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _prompts_from(prompt_dataset, tokenizer) -> list[str]:
    """Prompt strings from a dataset with a ``prompt`` column (text, or chat messages) or a list of strings."""
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


def _logit_transform(config):
    """(scale, softcap) that the model applies to ``lm_head`` outputs (as TRL's fused head does)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            scale = float(getattr(text, name))
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1.0 / text.logits_scaling
    return (1.0 if scale is None else scale), getattr(text, "final_logit_softcapping", None)


# --------------------------------------------------------------------------------------------- trainer
def _counted_window(inputs, mask: torch.Tensor):
    """``(input_ids, attention_mask, mask)`` cut to the rows with a position in ``mask`` and up to its last column.

    A causal model's hidden state at ``t`` does not depend on later tokens, so a pass on the cut batch gives the
    same values at the ``mask`` positions. Without any position the batch is returned whole.
    """
    ids, attention = inputs["input_ids"], inputs.get("attention_mask")
    if not bool(mask.any()):
        return ids, attention, mask
    rows, width = mask.any(1), int(mask.any(0).nonzero().max()) + 1
    attention = None if attention is None else attention[rows, :width]
    return ids[rows, :width], attention, mask[rows, :width]


class ConstrainedTrainer(SFTTrainer):
    """``SFTTrainer`` + λ·KL(q* || p_θ) towards the NADO-guided distribution, with guidance rounds.

    Args:
        model, args, ...: as for ``trl.SFTTrainer`` (text, prompt/completion or messages datasets;
            ``peft_config`` for a LoRA policy). ``args`` is a :class:`ConstrainedConfig`.
        constraint: a :class:`~steer.constraints.Constraint` labelling policy samples.
        prompt_dataset: prompts to sample from in guidance rounds: a dataset with a ``prompt`` column
            (strings or chat messages) or a list of strings.

    ``self.guidance`` is the :class:`~steer.guidance.GuidanceModel` the loss uses. ``save_model(dir)``
    writes the policy (PEFT adapter, or the full model) and ``dir/guidance/``; ``save_steps`` checkpoints
    also hold the guidance optimizer, the sample buffer and the round counter for exact resumption.
    """

    _tag_names = ["trl", "sft", "steer", "constrained"]
    _name = "Constrained"

    def __init__(
        self,
        model,
        args: ConstrainedConfig | None = None,
        *sft_args,
        constraint: Constraint | None = None,
        prompt_dataset: Dataset | list[str] | None = None,
        **sft_kwargs,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = ConstrainedConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-Constrained")
        if not isinstance(args, ConstrainedConfig):
            raise TypeError(
                f"ConstrainedTrainer needs args=ConstrainedConfig(...), got {type(args).__name__}"
            )
        if not isinstance(constraint, Constraint):
            raise TypeError(
                f"ConstrainedTrainer needs constraint= a steer.constraints.Constraint, got {type(constraint).__name__}"
            )
        super().__init__(model, args, *sft_args, **sft_kwargs)
        self.constraint = constraint
        self.prompts = _prompts_from(prompt_dataset, self._tokenizer)

        policy = self.model
        self._is_peft = is_peft_model(policy)
        self._policy_adapter = policy.active_adapter if self._is_peft else None
        if args.guidance_backbone == "lora" and not self._is_peft:
            raise ValueError(
                "ConstrainedConfig.guidance_backbone='lora' puts the guidance adapter on the policy's frozen base "
                "weights, so the policy must be a PEFT model (pass peft_config=LoraConfig(...)); for a fully "
                "fine-tuned policy use guidance_backbone='separate'"
            )
        self._zero3 = sharding.is_zero3(self.accelerator)
        if self._zero3 and (not self._is_peft or args.schedule != "sequential"):
            raise UserInputError(
                "ConstrainedTrainer under DeepSpeed ZeRO-3 needs a PEFT policy (pass peft_config / use_peft) and "
                f"schedule='sequential' (got {'a PEFT' if self._is_peft else 'a fully fine-tuned'} policy and "
                f"schedule={args.schedule!r}): the rounds and the KL run on gathered weights outside the engine"
            )
        if args.kl_reference == "base" and not self._is_peft:
            raise ValueError(
                "ConstrainedConfig.kl_reference='base' needs a PEFT policy (the base is the model with its "
                "adapters disabled); use kl_reference='policy' or pass peft_config"
            )
        inner = policy.get_base_model() if self._is_peft else policy
        self._logit_scale, self._softcap = _logit_transform(inner.config)
        self._captured: list[torch.Tensor] | None = None
        backbone = getattr(inner, "base_model", inner)
        if backbone is inner:
            raise ValueError(
                f"cannot find the decoder body of {type(inner).__name__} to read its hidden states"
            )
        self._decoder = backbone
        self._warned_fused_fallback = False
        forward_params = inspect.signature(type(inner).forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in forward_params

        # The oracle's judgement of every token's own text: the guidance head's prior, and the flags that stop
        # the corpus KL after a violation. Computed once (rank 0 first, then read from its cache by the others,
        # so every rank starts from the same head).
        self._prior = self._flagged = None
        needs_prior = args.guidance_prior == "token" or (
            args.kl_corpus_stop_at_violation and args.kl_positions != "samples"
        )
        if needs_prior and args.kl_coef > 0:
            with self.accelerator.main_process_first():
                self._prior = token_prior(
                    constraint,
                    self._tokenizer,
                    int(inner.config.vocab_size),
                    cache_dir=args.guidance_prior_cache_dir,
                )
            self._flagged = self._prior < args.label_threshold
            logger.info(
                "token prior: %d of %d tokens flagged by %s on their own text",
                int(self._flagged.sum()),
                self._flagged.numel(),
                constraint.name,
            )

        # Words the tokenizer splits, judged by the oracle in context (a fixed part of z; see context_prior).
        split_words = None
        if args.guidance_context_prior == "corpus" and self._prior is not None:
            with self.accelerator.main_process_first():
                split_words = context_prior(
                    constraint,
                    self._tokenizer,
                    lexicon(self._corpus_texts(args.guidance_context_texts) + list(self.prompts)),
                    self._prior,
                    floor=args.guidance_prior_floor,
                    threshold=args.label_threshold,
                    cache_dir=args.guidance_prior_cache_dir,
                )

        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        with _isolated_rng(args.seed + 17):
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
                self.guidance = GuidanceModel(policy, args.guidance_config())
            self.guidance.set_trainable(False)
            if args.guidance_prior == "token" and self._prior is not None:
                self.guidance.init_head(prior_logits(self._prior, floor=args.guidance_prior_floor))
            self.guidance.set_context_prior(split_words)
            process_index, num_processes = self.accelerator.process_index, self.accelerator.num_processes
            common = dict(
                tokenizer=self._tokenizer,
                constraint=constraint,
                prompts=self.prompts,
                settings=args.round_settings(),
                lr=args.guidance_lr,
                seed=args.seed,
                buffer_size=args.sample_buffer_size,
                process_index=process_index,
                flagged=self._flagged,
                disable_tqdm=args.disable_tqdm,
            )
            if worker_policy is None:
                learner = GuidanceLearner(
                    policy, self.guidance, grad_sync=_grad_sync if num_processes > 1 else None, **common
                )
                self.schedule = SequentialSchedule(learner)
            elif args.schedule == "process":
                worker_guidance = GuidanceModel(worker_policy, args.guidance_config())
                worker_guidance.set_trainable(False)
                worker_guidance.set_context_prior(split_words)
                _copy_params(worker_guidance.trainable_parameters(), self.guidance.trainable_parameters())
                learner = GuidanceLearner(worker_policy, worker_guidance, **common)
                names = sorted(trainable)
                self.schedule = ProcessSchedule(
                    learner,
                    policy_params=lambda: _params(policy, names),
                    policy_names=names,
                    guidance_params=self.guidance.trainable_parameters,
                    synchronised=args.parallel_synchronised,
                    worker_threads=args.parallel_worker_threads,
                    sync_weights=_average_weights if num_processes > 1 else None,
                    device=args.guidance_process_device,
                    timeout=args.guidance_process_timeout,
                )
            else:
                worker_guidance = GuidanceModel(worker_policy, args.guidance_config())
                worker_guidance.set_trainable(False)
                worker_guidance.set_context_prior(split_words)
                _copy_params(worker_guidance.trainable_parameters(), self.guidance.trainable_parameters())
                worker_tokenizer = copy.deepcopy(self._tokenizer)  # fast tokenizers are not thread-safe
                learner = GuidanceLearner(
                    worker_policy, worker_guidance, **{**common, "tokenizer": worker_tokenizer}
                )
                names = sorted(trainable)
                self.schedule = ParallelSchedule(
                    learner,
                    policy_params=lambda: _params(policy, names),
                    worker_policy_params=lambda: _params(worker_policy, names),
                    guidance_params=self.guidance.trainable_parameters,
                    synchronised=args.parallel_synchronised,
                    worker_threads=args.parallel_worker_threads,
                    sync_weights=_average_weights if num_processes > 1 else None,
                )
        self._pad_token_id = learner.pad_token_id
        self.rounds_started = 0
        self.round_history: list[dict[str, float]] = []  # one record per finished round (all ranks averaged)
        self._sample_draws: dict[int, int] = {}
        self.add_callback(CurvesCallback())
        # After the worker copy: a deep copy would otherwise carry this hook (and the trainer) along.
        self._hook = backbone.register_forward_hook(self._capture_hidden)
        if self.is_fsdp_enabled:
            self._setup_fsdp2()

    # ------------------------------------------------------------------ FSDP2 (see steer.trainers.sharding)
    # The policy (base weights + policy LoRA) is sharded by FSDP2: each decoder layer, the input embedding
    # and the output head are their own units, the rest belongs to the root (the PEFT model). The guidance
    # model's trained weights (its LoRA adapter on the same base, its head) are REPLICATED (FSDP2
    # ``ignored_params``): they train in the rounds, outside the policy's forward, with their own optimizer
    # and an explicit gradient all-reduce, exactly as under DDP. Reads outside the wrapped forward:
    #   - guidance rounds (sampling with generate, labelling, guidance training) run inside
    #     ``sharding.unsharded(model)``: every unit all-gathered once, none resharded until the round ends;
    #   - the KL's guidance pass and base-reference pass run between the training forward and its backward,
    #     through the decoder's own units (each all-gathers in its forward hook; the root's parameters are
    #     still unsharded then);
    #   - the fused KL reads the output head's weight after an explicit ``unshard()`` of its unit;
    #   - saving: the Trainer's FSDP path gathers a full state dict on every rank (``save_model``) for
    #     ``_save``; resuming: accelerate loads ``pytorch_model_fsdp.bin`` / ``optimizer.bin`` into the shards,
    #     the guidance weights and rounds come from ``constrained_state_rank*.pt`` as under DDP.
    # The parallel and process schedules (a worker on a copy of the policy) are refused under FSDP2.
    #
    # DeepSpeed ZeRO-3 partitions every parameter of the engine's module, the guidance adapter included (the
    # guidance head lives outside it and stays whole). Each round and each step's KL part run inside
    # ``sharding.zero3_whole`` (everything gathered, DeepSpeed's per-module hooks off: the rounds' forwards differ
    # in number between ranks); the round keeps rank 0's guidance weights (identical on all ranks). ``_save``
    # (called on every rank under DeepSpeed) and checkpoints gather the guidance adapter; resuming goes through
    # ``_load_optimizer_and_scheduler`` because the Trainer's DeepSpeed path never calls ``_load_from_checkpoint``.
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        sharding.refuse_cpu_deepspeed(self.accelerator)
        if sharding.promote_cpu_fsdp(self.accelerator):
            self.is_fsdp_enabled = True
        if sharding.is_fsdp(self.accelerator):
            sharding.require_fsdp2(self.accelerator, "ConstrainedTrainer")

    def _whole_policy(self, *, modifier_rank: int | None = None):
        """The policy's weights whole for work outside its forward: FSDP2 units unsharded, or (ZeRO-3) every
        parameter gathered with DeepSpeed's module hooks off (``modifier_rank``: whose changes are kept, e.g. the
        guidance adapter trained in a round). A no-op otherwise. Collective."""
        if self.is_fsdp_enabled:
            return sharding.unsharded(self.model)
        if self._zero3:
            return sharding.zero3_whole(self.model_wrapped, modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def _setup_fsdp2(self) -> None:
        if isinstance(self.schedule, (ParallelSchedule, ProcessSchedule)):
            raise UserInputError(
                f"ConstrainedConfig.schedule={self.args.schedule!r} is not supported under FSDP2 (its worker runs "
                "on a copy of the sharded policy); use schedule='sequential'"
            )
        plugin = self.accelerator.state.fsdp_plugin
        ignored = [self.guidance.head]
        if self.guidance.backbone is not None:
            ignored.append(self.guidance.backbone)
        else:
            name = self.guidance.config.adapter_name
            ignored += [
                module
                for path, module in self.model.named_modules()
                if path.split(".")[-1] == name and path.split(".")[-2:-1] in (["lora_A"], ["lora_B"])
            ]
        plugin.ignored_modules = ignored
        # accelerate's rank-0-loads path (meta device + broadcast into shards) cannot hold replicated guidance
        # weights; FSDP2 (unlike DDP) does not sync initial weights either: every rank takes rank 0's policy
        # (base + adapters; ranks > 0 may even have loaded it without weights) and guidance model
        plugin.cpu_ram_efficient_loading = False
        sharding.broadcast_module(self.model)
        sharding.broadcast_module(self.guidance)
        for module in ignored:  # FSDP2 places what it shards, not the replicated guidance weights
            module.to(self.args.device)

    # ------------------------------------------------------------------ the loss
    def _capture_hidden(self, module, args, output) -> None:
        if self._captured is not None and not self._captured:
            hidden = getattr(output, "last_hidden_state", None)
            self._captured.append(hidden if hidden is not None else output[0])

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        model = self.accelerator.unwrap_model(self.model)
        logits = model.get_output_embeddings()(hidden)
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _corpus_texts(self, limit: int) -> list[str]:
        """The decoded text of the first ``limit`` training rows (for the context prior's words)."""
        dataset = self.train_dataset
        if dataset is None or "input_ids" not in getattr(dataset, "column_names", []):
            return []
        ids = [list(row) for row in dataset.select(range(min(limit, len(dataset))))["input_ids"]]
        return self._tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _contexts(self, inputs, mask) -> torch.Tensor | None:
        """The context prior's ``[N, L]`` view of the ``mask`` positions (``None`` without a context prior)."""
        contexts = self.guidance.contexts(inputs["input_ids"], inputs.get("attention_mask"))
        return None if contexts is None else contexts[mask.to(contexts.device)]

    def _guidance_logits(self, inputs, mask) -> torch.Tensor:
        """``z`` [N, V] at the counted hidden positions: the guidance head on those rows only."""
        hidden = self._guidance_hidden(inputs, mask)
        head = self.guidance.head
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            z = torch.nn.functional.linear(hidden.float(), head.weight, head.bias)
        return self.guidance.add_context_(z, self._contexts(inputs, mask))

    def _corpus_mask(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden positions ``[B, T]`` whose next-token distribution SFT supervises, and their target ids."""
        if "shift_labels" in inputs:
            labels = inputs["shift_labels"]
            return labels != -100, labels
        labels = inputs["labels"]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        return mask, targets

    def _corpus_kl_mask(self, inputs, supervised: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The supervised positions the corpus KL counts: all, or up to the first flagged target token (or, with
        a context prior, the first target that completes a flagged word)."""
        if not self.args.kl_corpus_stop_at_violation or self._flagged is None:
            return supervised
        flagged = self._flagged.to(targets.device)[targets.clamp(min=0)] & supervised
        prior = self.guidance.context_prior
        if prior is not None and bool(supervised.any()):
            rows, width = supervised.shape  # the corpus rows (policy-sample rows may follow them in inputs)
            ids, attention = inputs["input_ids"][:rows, :width], inputs.get("attention_mask")
            contexts = self.guidance.contexts(ids, None if attention is None else attention[:rows, :width])
            completes = prior.flags_at(contexts[supervised], targets[supervised])
            flagged = flagged.clone()
            flagged[supervised] |= completes.to(flagged.device)
        before = flagged.long().cumsum(1) - flagged.long()  # flagged targets strictly before this position
        return supervised & (before == 0)

    def _sample_rows(self) -> dict | None:
        """A right-padded batch of the newest round's policy samples (drawn per step, seeded), or None."""
        pool = self.schedule.samples
        if not pool:
            return None
        step = self.state.global_step
        draw = self._sample_draws.get(step, 0)
        self._sample_draws = {step: draw + 1}
        seed = round_seed(self.args.seed + 7919, step * 64 + draw, self.accelerator.process_index)
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        items = [pool[i] for i in order[: self.args.kl_sample_batch_size].tolist()]
        return SampleBuffer.collate(items, self._pad_token_id)

    @staticmethod
    def _append_rows(inputs: dict, rows: dict, pad_token_id: int) -> dict:
        """``inputs`` with the sample rows appended (labels -100: SFT ignores them), padded to one width."""
        device = inputs["input_ids"].device
        width = max(inputs["input_ids"].shape[1], rows["input_ids"].shape[1])

        def widen(tensor, value):
            pad = width - tensor.shape[1]
            return torch.nn.functional.pad(tensor, (0, pad), value=value) if pad else tensor

        extra = {
            "input_ids": rows["input_ids"],
            "attention_mask": rows["attention_mask"],
            "labels": torch.full_like(rows["input_ids"], -100),
        }
        out = dict(inputs)
        for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", -100)):
            if key not in inputs:
                continue
            out[key] = torch.cat([widen(inputs[key], fill), widen(extra[key].to(device), fill)])
        for key in ("position_ids", "completion_mask", "assistant_masks", "shift_labels"):
            if key in inputs:
                raise ValueError(f"kl_positions with samples does not support batches carrying {key!r}")
        return out

    def _reference_logits(self, inputs, mask, policy_logits) -> torch.Tensor:
        if self.args.kl_reference == "policy":
            return policy_logits.detach()
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), model.disable_adapter():
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
            ).logits
        return logits[mask]

    def _reference_hidden(self, inputs, mask) -> torch.Tensor:
        """The base model's last hidden states ``[N, H]`` at the counted positions (adapters disabled, no grad),
        from a pass on the :func:`_counted_window` only."""
        model = self.accelerator.unwrap_model(self.model)
        ids, attention, mask = _counted_window(inputs, mask)
        with torch.no_grad(), model.disable_adapter():
            out = self._decoder(input_ids=ids, attention_mask=attention, use_cache=False)
        hidden = getattr(out, "last_hidden_state", None)
        return (hidden if hidden is not None else out[0])[mask]

    def _head_is_linear(self) -> bool:
        """Whether the policy's output head is a plain ``nn.Linear`` (under FSDP2: its wrapped class is)."""
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        kind = type(head)
        if self.is_fsdp_enabled and sharding.fsdp_units(head):
            kind = kind.__bases__[-1]  # fully_shard's class FSDP<cls>(FSDPModule, cls)
        return kind is torch.nn.Linear

    def _fused_head(self) -> torch.nn.Linear | None:
        """The policy's output head when the fused KL can use its weights directly, else None (with a warning)."""
        if self.args.kl_implementation != "fused":
            return None
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        if self._head_is_linear():
            if self.is_fsdp_enabled and sharding.fsdp_units(head):
                head.unshard()  # FSDP2: the head's unit (every rank, in step); a no-op after the policy forward
            return head
        if not self._warned_fused_fallback:
            logger.warning(
                "kl_implementation='fused' needs a plain nn.Linear output head, got %s; using 'chunked'",
                type(head).__name__,
            )
            self._warned_fused_fallback = True
        return None

    def _shares_head(self, inputs, return_outputs: bool) -> bool:
        """Whether this call computes the SFT loss inside the fused KL pass (one head pass, see the module doc).

        Otherwise TRL's ``compute_loss`` computes it (its fused LM head), e.g. for label smoothing, a
        ``loss_type`` other than 'nll', a ``compute_loss_func``, an MoE aux loss or sequence/context parallelism.
        """
        if self.args.kl_coef <= 0 or self.args.kl_implementation != "fused" or return_outputs:
            return False
        if self.compute_loss_func is not None or self.label_smoother is not None:
            return False
        if getattr(self.args, "loss_type", "nll") != "nll" or getattr(self, "aux_loss_enabled", False):
            return False
        if "labels" not in inputs or "shift_labels" in inputs or not self._accepts_logits_to_keep:
            return False
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (
            getattr(parallelism, "sp_enabled", False) or getattr(parallelism, "cp_enabled", False)
        ):
            return False
        return self._head_is_linear()

    def _body_forward(self, model, inputs) -> torch.Tensor:
        """The policy's last hidden states ``[B, T, H]`` from its (wrapped) forward, the head on one position only."""
        kwargs = {key: value for key, value in inputs.items() if key != "labels"}
        kwargs.update(use_cache=False, logits_to_keep=1)
        self._captured = []
        try:
            model(**kwargs)
            if not self._captured:
                raise RuntimeError(
                    "ConstrainedTrainer could not read the policy's hidden states for the KL term"
                )
            return self._captured[0]
        finally:
            self._captured = None

    def _log_sft_metrics(self, mode: str, inputs, supervised, entropy, is_top1) -> None:
        """TRL's SFT metrics (entropy, mean_token_accuracy, num_tokens) from the shared head pass."""
        stats = torch.stack([supervised.sum().float(), entropy.sum().float(), is_top1.sum().float()]).view(
            1, 3
        )
        num_valid, entropy_sum, num_correct = self.accelerator.gather_for_metrics(stats).view(-1, 3).sum(0)
        num_valid = float(num_valid)
        self._metrics[mode]["entropy"].append(float(entropy_sum) / num_valid if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(
            float(num_correct) / num_valid if num_valid > 0 else 0.0
        )
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            else:
                width = torch.tensor(inputs["input_ids"].size(1), device=inputs["input_ids"].device)
                tokens = self.accelerator.gather_for_metrics(width).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    @property
    def _sample_coef(self) -> float:
        """λ of the policy-sample KL term (``kl_sample_coef``, else ``kl_coef``)."""
        coef = self.args.kl_sample_coef
        return self.args.kl_coef if coef is None else coef

    def _kl_terms(
        self, inputs, hidden, masks: dict[str, torch.Tensor], weights: dict[str, Any], targets, nll=None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Detached KL sums ``{name: sum over positions}`` per position set, and ``sum_name weights[name] * sum``.

        One guidance pass serves all sets; with ``kl_implementation='fused'`` one head pass does too (the
        weights become per-row weights of :func:`~steer.guidance.fused_constraint_kl`). ``nll`` = ``(mask
        [B, T], targets [B, T], weight)`` (fused only) adds the SFT NLL to the same pass: ``terms`` then also
        holds ``"nll"``, ``"entropy"`` and ``"is_top1"`` (sums over the NLL positions).
        """
        union = torch.zeros_like(hidden[..., 0], dtype=torch.bool)
        for mask in masks.values():
            union |= mask
        if nll is not None:
            union |= nll[0]
        zero = hidden.new_zeros((), dtype=torch.float32)
        if not bool(union.any()) and nll is None:
            return {name: zero for name in masks}, zero
        logging_step = self.state.global_step % max(1, int(self.args.logging_steps or 1)) == 0
        log_share = self.model.training and logging_step and "corpus" in masks
        head = self._fused_head()
        if head is None and self._zero3:
            raise UserInputError(
                "ConstrainedTrainer under DeepSpeed ZeRO-3 needs kl_implementation='fused' and a plain nn.Linear "
                "output head (the KL's gradient must be computed while the head's weight is gathered)"
            )
        if head is not None:
            return self._fused_kl_terms(inputs, hidden, masks, weights, targets, union, head, log_share, nll)
        if nll is not None:
            raise RuntimeError("the SFT NLL shares the head pass only on the fused path")
        policy_logits = self._head_logits(hidden[union])  # [N, V], with gradient
        with torch.no_grad():  # z only where the KL counts (the guidance head is vocabulary-wide)
            z = self._guidance_logits(inputs, union)
        ref_logits = self._reference_logits(inputs, union, policy_logits)
        terms, total = {}, zero
        for name, mask in masks.items():
            rows = mask[union]
            term = constraint_kl(
                policy_logits[rows][None],
                ref_logits[rows][None],
                z[rows][None],
                None,
                chunk_size=self.args.kl_chunk_size,
                reduction="sum",
            )
            terms[name] = term.detach()
            total = total + weights[name] * term
        if log_share:
            detached = policy_logits.detach()
            self._log_grad_share(
                lambda index: detached[index],
                lambda index: ref_logits[index],
                lambda index: z[index],
                masks,
                union,
                targets,
            )
        return terms, total

    def _fused_kl_terms(self, inputs, hidden, masks, weights, targets, union, head, log_share, nll=None):
        """:meth:`_kl_terms` from hidden states: every position set (and the NLL) in one chunked head + KL pass.

        The rows go in KL positions first (row-major), then the NLL-only ones, so the guidance model (and the
        base reference) run only up to the KL positions and the fused pass computes no ``z`` for the rest.
        """
        kl_union = torch.zeros_like(union)
        for mask in masks.values():
            kl_union |= mask
        flat_union, flat_kl = union.reshape(-1), kl_union.reshape(-1)
        order = torch.cat([flat_kl.nonzero().view(-1), (flat_union & ~flat_kl).nonzero().view(-1)])
        n_kl = int(flat_kl.sum())
        policy_hidden = hidden.reshape(-1, hidden.shape[-1])[order]  # [N, H], with gradient
        with torch.no_grad():
            guidance_hidden = self._guidance_hidden(inputs, kl_union)
        base_hidden = self._reference_hidden(inputs, kl_union) if self.args.kl_reference == "base" else None
        rows = {name: mask.reshape(-1)[order] for name, mask in masks.items()}
        row_weight = torch.zeros(policy_hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for name, mask in rows.items():
            weight = torch.as_tensor(weights[name], device=hidden.device).float()
            row_weight = row_weight + mask.float() * weight
        nll_kwargs = {}
        if nll is not None:
            nll_mask, nll_targets, nll_weight = nll
            nll_kwargs = {
                "targets": torch.where(nll_mask, nll_targets, -100).reshape(-1)[order],
                "nll_weight": torch.as_tensor(nll_weight, device=hidden.device).float(),
            }
        guidance_head = self.guidance.head
        z_source = (guidance_hidden, guidance_head.weight, guidance_head.bias)
        contexts = self._contexts(inputs, kl_union)
        if contexts is not None:  # z = the head's logits + the context prior's offsets, chunk by chunk

            def z_fn(start: int, end: int) -> torch.Tensor:
                z = torch.nn.functional.linear(
                    guidance_hidden[start:end].float(), guidance_head.weight, guidance_head.bias
                )
                return self.guidance.add_context_(z, contexts[start:end])

            z_source = (z_fn, None, None)
        out = fused_constraint_kl(
            policy_hidden,
            head.weight,
            head.bias,
            *z_source,
            reference="policy" if base_hidden is None else base_hidden,
            row_weight=row_weight,
            logit_scale=self._logit_scale,
            logit_softcap=self._softcap,
            chunk_size=min(
                self.args.kl_chunk_size, fused_chunk_size(policy_hidden.shape[0], vocab=head.weight.shape[0])
            ),
            reduction="sum",
            kl_rows=n_kl,
            grad_stats=log_share,
            **nll_kwargs,
        )
        if log_share and bool(rows["corpus"].any()):
            # the gradient statistics came out of the same pass (no extra head pass)
            dd, lm_sq, dot = out.grad_stats[rows["corpus"]].double().sum(0).tolist()
            coef = float(self.args.kl_coef)
            self._append_grad_share(coef * coef * dd, lm_sq, coef * dot)
        terms = {name: out.kl[mask].sum() for name, mask in rows.items()}
        if nll is not None:
            terms.update(nll=out.nll.sum(), entropy=out.entropy.sum(), is_top1=out.is_top1.sum())
        return terms, out.loss

    def _guidance_hidden(self, inputs, union: torch.Tensor) -> torch.Tensor:
        """The guidance model's last hidden states ``[N, Hg]`` at the ``union`` positions (no grad), from a pass on
        the :func:`_counted_window` only."""
        if not bool(union.any()):
            return torch.zeros(0, self.guidance.head.weight.shape[1], device=union.device)
        ids, attention, union = _counted_window(inputs, union)
        return self.guidance.hidden_states(ids, attention)[union]

    def _log_grad_share(self, policy_logits, ref_logits, z, masks, union, targets) -> None:
        """The KL gradient's share of the total at the counted corpus positions (w.r.t. the logits, norms).

        ``policy_logits``, ``ref_logits`` and ``z`` map an index of union rows to those rows' ``[rows, V]``
        logits. Chunked like the KL itself (``kl_chunk_size`` rows at a time), so it never holds an [N, V]
        tensor more.
        """
        from steer.guidance import guided_log_probs

        rows = masks["corpus"][union]
        if not bool(rows.any()):
            return
        target = targets[masks["corpus"][: targets.shape[0], : targets.shape[1]]].clamp(min=0)
        index = rows.nonzero().view(-1)
        kl_sq = lm_sq = dot = 0.0
        with torch.no_grad():
            for start in range(0, len(target), self.args.kl_chunk_size):
                part = slice(start, start + self.args.kl_chunk_size)
                rows_part = index[part]
                p = torch.softmax(policy_logits(rows_part).float(), -1)
                log_q = guided_log_probs(ref_logits(rows_part), z(rows_part))
                kl_grad = self.args.kl_coef * (p - log_q.exp())
                p[torch.arange(p.shape[0]), target[part]] -= 1.0  # p is now the LM gradient
                kl_sq += float(kl_grad.square().sum())
                lm_sq += float(p.square().sum())
                dot += float((kl_grad * p).sum())
        self._append_grad_share(kl_sq, lm_sq, dot)

    def _append_grad_share(self, kl_sq: float, lm_sq: float, dot: float) -> None:
        """Log the KL gradient's share and cosine from ``|g_kl|^2``, ``|g_lm|^2`` and ``<g_kl, g_lm>`` (logits)."""
        kl_norm, lm_norm = math.sqrt(max(kl_sq, 0.0)), math.sqrt(max(lm_sq, 0.0))
        self._metrics["train"]["kl_grad_share"].append(kl_norm / max(kl_norm + lm_norm, 1e-12))
        self._metrics["train"]["kl_grad_cosine"].append(dot / max(kl_norm * lm_norm, 1e-12))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """SFT loss (TRL's own computation) + ``kl_coef`` · KL at the corpus and/or policy-sample positions.

        Policy samples (``kl_positions`` 'samples'/'both') are appended to the batch with labels -100, so one
        forward serves SFT and both KL terms; the corpus term is divided by the SFT token count
        (``num_items_in_batch``), the sample term by its own token count (times gradient accumulation).
        """
        mode = "train" if self.model.training else "eval"
        use_kl = self.args.kl_coef > 0
        n_corpus = inputs["input_ids"].shape[0]
        supervised, targets = self._corpus_mask(inputs)
        rows = None
        if use_kl and mode == "train" and self.args.kl_positions != "corpus" and self._sample_coef > 0:
            rows = self._sample_rows()
            if rows is not None:
                inputs = self._append_rows(inputs, rows, self._pad_token_id)
        shared = self._shares_head(inputs, return_outputs)
        if shared:  # the SFT loss comes out of the fused KL pass below
            hidden = self._body_forward(model, inputs)
            result = sft_loss = None
            device = hidden.device
        else:
            self._captured = [] if use_kl else None
            try:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                hidden = self._captured[0] if use_kl and self._captured else None
            finally:
                self._captured = None
            sft_loss = result[0] if return_outputs else result
            device = sft_loss.device
        count = supervised.sum()
        denom = torch.as_tensor(count if num_items_in_batch is None else num_items_in_batch, device=device)
        denom = denom.clamp(min=1)
        factor = 1
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            factor = self.accelerator.num_processes // self.get_tp_size()  # as SFTTrainer scales its loss

        loss = sft_loss
        kl_sum = torch.zeros((), device=device)
        kl_samples_sum = torch.zeros((), device=device)
        sample_count = torch.zeros((), device=device)
        if use_kl:
            if hidden is None:
                raise RuntimeError(
                    "ConstrainedTrainer could not read the policy's hidden states for the KL term"
                )
            total = inputs["input_ids"].shape[0]
            masks = {}
            if self.args.kl_positions in ("corpus", "both"):
                corpus = torch.zeros(total, hidden.shape[1], dtype=torch.bool, device=hidden.device)
                corpus[:n_corpus, : supervised.shape[1]] = self._corpus_kl_mask(inputs, supervised, targets)
                masks["corpus"] = corpus
            if rows is not None:
                cont = rows["continuation_mask"].to(hidden.device)
                sample = torch.zeros(total, hidden.shape[1], dtype=torch.bool, device=hidden.device)
                sample[n_corpus:, : cont.shape[1] - 1] = cont[
                    :, 1:
                ]  # position t predicts continuation token t+1
                masks["samples"] = sample
                sample_count = sample.sum().float()
            nll = None
            if shared:  # the corpus rows' SFT targets, on the (possibly widened) batch
                nll_mask = torch.zeros(total, hidden.shape[1], dtype=torch.bool, device=hidden.device)
                nll_mask[:n_corpus, : supervised.shape[1]] = supervised
                nll_targets = torch.full_like(nll_mask, -100, dtype=torch.long)
                nll_targets[:n_corpus, : targets.shape[1]] = targets
                nll = (nll_mask, nll_targets, factor / denom)
            if masks or shared:
                weights = {}
                if "corpus" in masks:
                    weights["corpus"] = (self.args.kl_coef * factor) / denom
                if "samples" in masks:
                    # A mean over the sample tokens; spread over the accumulation window like the SFT loss
                    # (when num_items_in_batch is None the Trainer divides the whole loss by it itself).
                    accumulation = 1
                    if num_items_in_batch is not None:
                        accumulation = getattr(
                            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
                        )
                    weights["samples"] = self._sample_coef / (sample_count * accumulation).clamp(min=1)
                # ZeRO-3: the guidance pass, the base reference and the fused head read run on gathered weights
                # (FSDP2 needs no such block here: its units gather in their own forwards)
                whole = sharding.zero3_whole(self.model_wrapped) if self._zero3 else contextlib.nullcontext()
                with whole:
                    terms, weighted = self._kl_terms(inputs, hidden, masks, weights, targets, nll)
                if shared:
                    loss = weighted
                    sft_loss = (terms["nll"] * factor / denom).detach()
                    self._log_sft_metrics(mode, inputs, supervised, terms["entropy"], terms["is_top1"])
                else:
                    loss = loss + weighted.to(sft_loss.dtype)
                kl_sum = terms.get("corpus", kl_sum)
                if "samples" in terms and sample_count > 0:
                    kl_samples_sum = terms["samples"]

        with torch.no_grad():  # per-token lm_loss and kl of this micro-batch, summed over processes
            sft_sum = sft_loss.detach().float() * denom / factor
            stats = torch.stack(
                [
                    sft_sum,
                    kl_sum.detach().float(),
                    count.float(),
                    kl_samples_sum.detach().float(),
                    sample_count,
                ]
            ).view(1, 5)
            stats = self.accelerator.gather_for_metrics(stats).view(-1, 5).sum(0)
        tokens = float(stats[2].clamp(min=1))
        self._metrics[mode]["lm_loss"].append(float(stats[0]) / tokens)
        if use_kl:
            if self.args.kl_positions != "samples":
                self._metrics[mode]["kl"].append(float(stats[1]) / tokens)
            if float(stats[4]) > 0:
                self._metrics[mode]["kl_samples"].append(float(stats[3]) / float(stats[4]))
        return (loss, result[1]) if return_outputs else loss

    # ------------------------------------------------------------------ guidance rounds
    @property
    def staleness(self) -> int:
        """Rounds between the current interval's round and the guidance version the policy uses."""
        return max(self.rounds_started - 1 - self.schedule.version, 0) if self.rounds_started else 0

    def _log_round_metrics(self, finished: list[dict[str, float]]) -> None:
        for metrics in finished:
            values = torch.tensor(
                [float(metrics.get(key, math.nan)) for key in ROUND_METRICS], device=self.args.device
            )
            if self.accelerator.num_processes > 1:
                values = self.accelerator.gather(values.view(1, -1)).view(-1, len(ROUND_METRICS)).nanmean(0)
            record = {"step": self.state.global_step}
            for key, value in zip(ROUND_METRICS, values.tolist()):
                if not math.isnan(value):
                    self._metrics["train"][key].append(value)
                    record[key] = value
            self.round_history.append(record)

    def _maybe_run_round(self) -> None:
        if self.args.kl_coef <= 0:
            return  # the plain-SFT baseline: the guidance model is never used, so never trained
        interval = self.args.guidance_interval
        while self.rounds_started * interval <= self.state.global_step:
            round_index = self.rounds_started
            self.rounds_started += 1
            if isinstance(self.schedule, SequentialSchedule):
                # FSDP2 / ZeRO-3: the whole policy gathered for the round (no-op otherwise); every rank runs it
                seed = round_seed(self.args.seed, round_index, self.accelerator.process_index)
                with self._whole_policy(modifier_rank=0), _isolated_rng(seed):
                    finished = self.schedule.on_round(round_index)
            else:
                finished = self.schedule.on_round(round_index)
            self.guidance.set_trainable(False)
            self._log_round_metrics(finished)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.schedule.check()  # a failed background round (parallel/process) stops training at this step
        self._maybe_run_round()
        self._metrics["train"]["guidance/staleness"].append(float(self.staleness))
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._log_round_metrics(self.schedule.finish())

    # ------------------------------------------------------------------ saving and resuming
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if self._is_peft and self.args.guidance_backbone == "lora":
            # Only the policy adapter: PEFT would otherwise also write the guidance adapter into a subfolder.
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(
                output_dir,
                state_dict=state_dict,
                selected_adapters=[self._policy_adapter],
                is_main_process=self.args.should_save,
            )
            if self.args.should_save:
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        else:
            super()._save(output_dir, state_dict)
        # ZeRO-3: the Trainer calls _save on every rank; the guidance adapter is gathered for rank 0 to write
        with sharding.zero3_gathered(self.guidance.trainable_parameters()):
            if self.args.should_save:
                atomic_dir(Path(output_dir) / GUIDANCE_DIR, self.guidance.save_pretrained)

    def _state_path(self, directory: str | os.PathLike) -> Path:
        name = STATE_NAME
        if self.accelerator.num_processes > 1:
            name = f"constrained_state_rank{self.accelerator.process_index}.pt"
        return Path(directory) / name

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        output_dir = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        output_dir.mkdir(parents=True, exist_ok=True)
        with sharding.zero3_gathered(self.guidance.trainable_parameters()):  # ZeRO-3: whole guidance weights
            schedule = self.schedule.state_dict()
        state = {
            "format": 1,
            "rounds_started": self.rounds_started,
            "schedule": schedule,
            "round_history": [dict(r) for r in self.round_history],
            "total_train_tokens": int(getattr(self, "_total_train_tokens", 0)),  # TRL's num_tokens counter
        }
        atomic_torch_save(state, self._state_path(output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_constrained_state(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_deepspeed_enabled:
            # under DeepSpeed the Trainer loads the engine's checkpoint instead of calling _load_from_checkpoint
            self._load_constrained_state(checkpoint)

    def _load_constrained_state(self, resume_from_checkpoint) -> None:
        """The guidance model, its optimizer, the sample buffers and the round counters from a checkpoint."""
        path = self._state_path(resume_from_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {resume_from_checkpoint} was not written by ConstrainedTrainer (or is incomplete)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        with sharding.zero3_gathered(self.guidance.trainable_parameters(), modifier_rank=0):
            self.schedule.load_state_dict(state["schedule"])
        self.rounds_started = int(state["rounds_started"])
        self.round_history = [dict(r) for r in state.get("round_history", [])]
        if "total_train_tokens" in state:
            self._total_train_tokens = int(state["total_train_tokens"])
        if self._is_peft:
            self.model.set_adapter(self._policy_adapter)
        self.guidance.set_trainable(False)


def _unpatch_forward(model) -> None:
    """Drop TRL's instance-level fused-head ``forward`` from a deep copy (its closure calls the original)."""
    inner = model.get_base_model() if is_peft_model(model) else model
    inner.__dict__.pop("forward", None)


def _params(model, names: list[str]) -> list[torch.Tensor]:
    """The named parameters of ``model``, looked up afresh (loading a checkpoint may replace tensors)."""
    named = dict(model.named_parameters())
    return [named[n] for n in names]


def _copy_params(targets, sources) -> None:
    with torch.no_grad():
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)


def _grad_sync(params) -> None:
    """Average guidance gradients over processes (guidance rounds run outside DDP)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad.div_(world)


def _average_weights(params) -> None:
    import torch.distributed as dist

    world = dist.get_world_size()
    with torch.no_grad():
        for param in params:
            dist.all_reduce(param.data)
            param.data.div_(world)
