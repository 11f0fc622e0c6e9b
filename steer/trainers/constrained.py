"""Constrained fine-tuning: SFT on a corpus + λ·KL(q* || p_θ) towards the NADO-guided distribution.

``ConstrainedTrainer`` is TRL's ``SFTTrainer`` with one extra loss term and guidance rounds:

    loss = SFT(corpus) + kl_coef * KL(q* || p_θ)   on the same supervised positions SFT uses,

where ``log q* = log_softmax(ref + logsigmoid(z))`` and ``z`` comes from a guidance model trained, every
``guidance_interval`` optimizer steps, on policy samples labelled by a :class:`~steer.constraints.Constraint`.
The pieces live where they belong: the config in :mod:`steer.trainers.constrained_config`, the KL term (positions,
stop-at-violation, fused and chunked paths, statistics) in :class:`steer.guidance.ConstraintKL`, the oracle's
priors in :mod:`steer.guidance.oracle_priors`, the guidance model and its rounds' schedule in
:mod:`steer.trainers.guidance_setup` / :mod:`steer.trainers.schedule`, sharding in :mod:`steer.trainers.sharding`.
The trainer decides what goes into a batch (policy samples appended), divides the terms like the SFT loss
(``num_items_in_batch``: correct under gradient accumulation), runs the rounds and saves / resumes.

With ``kl_implementation="fused"`` (default) and no TRL-specific loss (label smoothing, a ``loss_type`` other
than 'nll', a ``compute_loss_func``, MoE aux loss, sequence/context parallelism) the policy's forward stops at
the body (``logits_to_keep=1``) and the SFT NLL comes out of the KL's own head pass; otherwise TRL computes the
SFT loss and the KL runs after it on the hidden states a forward hook kept.

Under several processes (DDP): the guidance parameters have ``requires_grad=False`` whenever the policy
steps (so DDP never sees them); guidance rounds run outside DDP on every rank with rank-specific samples,
and the guidance gradients are all-reduced (sequential schedule) or the swapped-in guidance weights are
averaged on the main thread (parallel and process schedules). Under FSDP2 the guidance weights stay replicated
(:func:`~steer.trainers.sharding.replicate_guidance`); under DeepSpeed ZeRO-3 each round and each step's KL
part run on gathered weights (:func:`~steer.trainers.sharding.zero3_whole`). Checkpoints hold one
``constrained_state_rank{i}.pt`` per rank (each rank's sample buffer).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import SFTTrainer

from steer.constraints import Constraint
from steer.errors import UserInputError
from steer.guidance import ConstraintKL, prefix_settled_by
from steer.guidance.oracle_priors import oracle_priors
from steer.io import atomic_dir, atomic_torch_save
from steer.models import init_policy_adapter, load_reference_adapter

from . import sharding
from .buffer import SampleBuffer
from .constrained_config import ConstrainedConfig
from .curves import CurvesCallback
from .guidance_setup import build_guidance, prompts_from
from .process_schedule import ProcessSchedule
from .schedule import ParallelSchedule, SequentialSchedule, isolated_rng, round_seed
from .timing import ROUND_TIME_METRICS, add_round_totals, count_sample_rows, new_timings, timed

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
    *ROUND_TIME_METRICS,
)


class ConstrainedTrainer(SFTTrainer):
    """``SFTTrainer`` + λ·KL(q* || p_θ) towards the NADO-guided distribution, with guidance rounds.

    Args:
        model, args, ...: as for ``trl.SFTTrainer`` (text, prompt/completion or messages datasets;
            ``peft_config`` for a LoRA policy). ``args`` is a :class:`ConstrainedConfig`.
        constraint: a :class:`~steer.constraints.Constraint` labelling policy samples.
        prompt_dataset: prompts to sample from in guidance rounds: a dataset with a ``prompt`` column
            (strings or chat messages) or a list of strings.

    ``self.timings``: where the run's wall time went (totals: ``train_s``, ``rounds_s``, the rounds' phases, the
    policy-sample rows; :mod:`steer.trainers.timing`); each round's ``time/round_*`` is also in ``round_history``.
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
        if args.kl_stop_when_satisfied and not constraint.monotone:
            raise UserInputError(
                f"ConstrainedConfig.kl_stop_when_satisfied: the constraint {constraint.name!r} is not monotone (a topic "
                "or an any_of word list is): no prefix settles it"
            )
        super().__init__(model, args, *sft_args, **sft_kwargs)
        self.constraint = constraint
        self.prompts = prompts_from(prompt_dataset, self._tokenizer)

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
        if args.kl_coef > 0:  # kl_coef 0: the plain-SFT twin, which trains these adapters, ignores them
            for name in ("kl_reference_adapter", "policy_init_adapter"):
                if getattr(args, name) is not None and (
                    self._zero3 or self.is_fsdp_enabled or not self._is_peft
                ):
                    raise UserInputError(
                        f"ConstrainedConfig.{name} needs a PEFT policy under DDP or ZeRO-2 (under FSDP2 or "
                        "DeepSpeed ZeRO-3 the adapter would be sharded with the policy)"
                    )
            if args.kl_reference_adapter is not None:
                load_reference_adapter(
                    policy,
                    args.kl_reference_adapter,
                    self._policy_adapter,
                    init_policy=args.policy_init_adapter is None,
                )
            if args.policy_init_adapter is not None:
                init_policy_adapter(policy, args.policy_init_adapter, self._policy_adapter)
        inner = policy.get_base_model() if self._is_peft else policy
        settings = args.kl_settings()

        # The oracle's judgement of every token's own text (the guidance head's start, the flags that stop the
        # corpus KL after a violation) and of split words: rank 0 first, the others read its caches.
        def context_texts() -> list[str]:
            return self._corpus_texts(args.guidance_context_texts) + list(self.prompts)

        self.priors = oracle_priors(
            constraint,
            self._tokenizer,
            int(inner.config.vocab_size),
            token_head=settings.enabled and args.guidance_prior == "token",
            token_flags=settings.needs_token_flags,
            context_texts=context_texts if args.guidance_context_prior == "corpus" else None,
            floor=args.guidance_prior_floor,
            threshold=args.label_threshold,
            cache_dir=args.guidance_prior_cache_dir,
            once=self.accelerator.main_process_first,
        )
        self.guidance, self.schedule, self._pad_token_id = build_guidance(
            policy,
            args,
            tokenizer=self._tokenizer,
            constraint=constraint,
            prompts=self.prompts,
            priors=self.priors,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
        )
        self.rounds_started = 0
        self.round_history: list[dict[str, float]] = []  # one record per finished round (all ranks averaged)
        self._sample_draws: dict[int, int] = {}
        self.timings = new_timings()  # where the run's wall time went (totals: steer.trainers.timing)
        self.add_callback(CurvesCallback())
        # After the worker copy: a deep copy would otherwise carry the KL's forward hook along.
        self.constraint_kl = ConstraintKL(
            self.guidance,
            lambda: self.accelerator.unwrap_model(self.model),
            settings,
            flagged=self.priors.flagged,
            gathered=(lambda: sharding.zero3_whole(self.model_wrapped)) if self._zero3 else None,
            require_fused=self._zero3,
            prefix_settled=prefix_settled_by(constraint, self._tokenizer)
            if settings.stop_when_satisfied
            else None,
            prefix_probs=functools.partial(constraint.prefix_probs, tokenizer=self._tokenizer)
            if settings.stop_at_violating_prefix
            else None,
        )
        if self.is_fsdp_enabled:
            self._setup_fsdp2()

    # ------------------------------------------------------------------ sharding (see steer.trainers.sharding)
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if sharding.check_accelerator(self.accelerator, "ConstrainedTrainer"):
            self.is_fsdp_enabled = True

    def _setup_fsdp2(self) -> None:
        """FSDP2: the policy sharded, the guidance weights replicated; reads outside the wrapped forward gather
        explicitly (rounds: ``sharding.unsharded``; the KL's passes: the decoder's own units; the fused head:
        its unit's ``unshard()``). The parallel and process schedules (a worker on a copy of the policy) are
        refused."""
        if isinstance(self.schedule, (ParallelSchedule, ProcessSchedule)):
            raise UserInputError(
                f"ConstrainedConfig.schedule={self.args.schedule!r} is not supported under FSDP2 (its worker runs "
                "on a copy of the sharded policy); use schedule='sequential'"
            )
        sharding.replicate_guidance(self.accelerator, self.model, self.guidance, self.args.device)

    # ------------------------------------------------------------------ the loss
    def _corpus_texts(self, limit: int) -> list[str]:
        """The decoded text of the first ``limit`` training rows (for the context prior's words)."""
        dataset = self.train_dataset
        if dataset is None or "input_ids" not in getattr(dataset, "column_names", []):
            return []
        ids = [list(row) for row in dataset.select(range(min(limit, len(dataset))))["input_ids"]]
        return self._tokenizer.batch_decode(ids, skip_special_tokens=True)

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

    def _shares_head(self, inputs, return_outputs: bool) -> bool:
        """Whether this call computes the SFT loss inside the fused KL pass (one head pass, see the module doc).

        Otherwise TRL's ``compute_loss`` computes it (its fused LM head), e.g. for label smoothing, a
        ``loss_type`` other than 'nll', a ``compute_loss_func``, an MoE aux loss or sequence/context parallelism.
        """
        if return_outputs or self.compute_loss_func is not None or self.label_smoother is not None:
            return False
        if getattr(self.args, "loss_type", "nll") != "nll" or getattr(self, "aux_loss_enabled", False):
            return False
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (
            getattr(parallelism, "sp_enabled", False) or getattr(parallelism, "cp_enabled", False)
        ):
            return False
        return self.constraint_kl.shares_head(inputs)

    def _log_sft_metrics(self, mode: str, inputs, supervised, entropy, is_top1) -> None:
        """TRL's SFT metrics (entropy, mean_token_accuracy, num_tokens) from the shared head pass."""
        stats = torch.stack([supervised.sum().float(), entropy.sum().float(), is_top1.sum().float()]).view(
            1, 3
        )
        num_valid, entropy_sum, num_correct = (
            self.accelerator.gather_for_metrics(stats.detach()).view(-1, 3).sum(0)
        )
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """SFT loss (TRL's own computation) + ``kl_coef`` · KL at the corpus and/or policy-sample positions.

        Policy samples (``kl_positions`` 'samples'/'both') are appended to the batch with labels -100, so one
        forward serves SFT and both KL terms; the corpus term is divided by the SFT token count
        (``num_items_in_batch``), the sample term by its own token count (times gradient accumulation).
        """
        mode = "train" if self.model.training else "eval"
        kl = self.constraint_kl
        use_kl = kl.settings.enabled
        n_corpus = inputs["input_ids"].shape[0]
        supervised, targets = kl.corpus_mask(inputs)
        rows = None
        if mode == "train" and kl.settings.uses_samples:
            with timed(self.timings, "sample_rows_s") as clock:
                rows = self._sample_rows()
                if rows is not None:
                    inputs = kl.append_rows(inputs, rows, self._pad_token_id)
            count_sample_rows(self.timings, rows)
            self._metrics[mode]["time/sample_rows_s"].append(clock.seconds)
        shared = self._shares_head(inputs, return_outputs)
        if shared:  # the SFT loss comes out of the fused KL pass below
            hidden = kl.body_forward(model, inputs)
            result = sft_loss = None
            device = hidden.device
        else:
            with kl.capture(use_kl) as captured:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                hidden = captured[0] if use_kl and captured else None
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
            # The sample term is a mean over its tokens, spread over the accumulation window like the SFT loss
            # (when num_items_in_batch is None the Trainer divides the whole loss by it itself).
            accumulation = 1
            if num_items_in_batch is not None:
                accumulation = getattr(
                    self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
                )
            logging_step = self.state.global_step % max(1, int(self.args.logging_steps or 1)) == 0
            out = kl(
                inputs,
                hidden,
                supervised=supervised,
                targets=targets,
                n_corpus=n_corpus,
                continuation_mask=None if rows is None else rows["continuation_mask"],
                denom=denom,
                factor=factor,
                accumulation=accumulation,
                share_nll=shared,
                grad_stats=self.model.training and logging_step,
            )
            for key, value in out.metrics.items():
                self._metrics["train"][key].append(value)
            if shared:
                loss = out.loss
                sft_loss = (out.terms["nll"] * factor / denom).detach()
                self._log_sft_metrics(mode, inputs, supervised, out.terms["entropy"], out.terms["is_top1"])
            elif out.loss is not None:
                loss = loss + out.loss.to(sft_loss.dtype)
            kl_sum = out.terms.get("corpus", kl_sum)
            if out.sample_count is not None:
                sample_count = out.sample_count
                if "samples" in out.terms and sample_count > 0:
                    kl_samples_sum = out.terms["samples"]

        with torch.no_grad():  # per-token lm_loss and kl of this micro-batch, summed over processes
            sft_sum = sft_loss.detach().float() * denom / factor
            parts = [sft_sum, kl_sum.detach().float(), count.float()]
            stats = torch.stack([*parts, kl_samples_sum.detach().float(), sample_count]).view(1, 5)
            stats = self.accelerator.gather_for_metrics(stats).view(-1, 5).sum(0)
        tokens = float(stats[2].clamp(min=1))
        self._metrics[mode]["lm_loss"].append(float(stats[0]) / tokens)
        if use_kl:
            if kl.settings.positions != "samples":
                self._metrics[mode]["kl"].append(float(stats[1]) / tokens)
            if float(stats[4]) > 0:
                self._metrics[mode]["kl_samples"].append(float(stats[3]) / float(stats[4]))
        return (loss, result[1]) if return_outputs else loss

    def trained_modules(self) -> list[torch.nn.Module]:
        """The modules this trainer trains: the policy and the guidance model (the replica check digests both)."""
        return [self.model, self.guidance]

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
            add_round_totals(self.timings, record)
            self.round_history.append(record)

    def run_due_rounds(self) -> None:
        """Run the guidance rounds due at the current step (``training_step`` calls it; the warm-up round is due
        before step 1)."""
        if not self.constraint_kl.settings.enabled:
            return  # the plain-SFT baseline: the guidance model is never used, so never trained
        interval = self.args.guidance_interval
        while self.rounds_started * interval <= self.state.global_step:
            round_index = self.rounds_started
            self.rounds_started += 1
            if isinstance(self.schedule, SequentialSchedule):
                # FSDP2 / ZeRO-3: the whole policy gathered for the round (no-op otherwise); every rank runs it
                seed = round_seed(self.args.seed, round_index, self.accelerator.process_index)
                whole = sharding.whole_model(
                    self.model,
                    self.model_wrapped,
                    fsdp=self.is_fsdp_enabled,
                    zero3=self._zero3,
                    modifier_rank=0,
                )
                with whole, isolated_rng(seed):
                    finished = self.schedule.on_round(round_index)
            else:
                finished = self.schedule.on_round(round_index)
            self.guidance.set_trainable(False)
            self._log_round_metrics(finished)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.schedule.check()  # a failed background round (parallel/process) stops training at this step
        with timed(self.timings, "rounds_s"):  # train_s - rounds_s: the steps without the rounds
            self.run_due_rounds()
        self._metrics["train"]["guidance/staleness"].append(float(self.staleness))
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        with timed(self.timings, "train_s"):
            try:
                return super().train(*args, **kwargs)
            finally:
                with timed(self.timings, "rounds_s"):
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
