"""``steer train constrained``: the recipe runner (what to train on, the constraint, load → train → save).

The trainer and its config live in :mod:`steer.trainers.constrained`; this module holds what a recipe adds
around them: :class:`ConstrainedScriptArguments` (model, corpus, prompts, constraint, LoRA), the run's constraint
from the constraint registry (:data:`steer.constraints.CONSTRAINTS`), dataset loading (RTP with its held-out
tail, or any local/hub table) and :func:`train_constrained`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from steer.constraints import CONSTRAINTS, Constraint, build_constraint, constraint_kwargs
from steer.data import RTP_HELDOUT_SIZE
from steer.errors import UserInputError, first_line
from steer.scripts.output import check_output_dir, resolve_resume, training_run
from steer.scripts.prerequisites import prerequisite_runs
from steer.trainers.constrained import STATE_NAME, ConstrainedConfig, ConstrainedTrainer

logger = logging.getLogger(__name__)

__all__ = [
    "ConstrainedConfig",
    "ConstrainedScriptArguments",
    "check_constrained_config",
    "check_constrained_model",
    "check_constrained_run",
    "filter_by_constraint",
    "load_constrained_datasets",
    "train_constrained",
]


@dataclass
class ConstrainedScriptArguments:
    """What a constrained run trains on (the trainer's own knobs live in :class:`ConstrainedConfig`)."""

    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={
            "help": "Policy model: the embedded 'smollm2-135m', a local directory, a .gguf file or a hub id."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    dataset_name: str = field(
        default="rtp",
        metadata={
            "help": "Fine-tuning corpus: 'rtp' (RealToxicityPrompts prompt+continuation; read from STEER_DATA_DIR "
            "when present, else allenai/real-toxicity-prompts), a local .json/.jsonl/.csv/.parquet file, or a "
            "hub dataset id. Text ('text'), prompt/completion or messages columns, as SFTTrainer takes them."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub/local dataset."})
    dataset_format: str = field(
        default="text",
        metadata={
            "help": "For dataset_name='rtp': 'text' (loss on prompt + continuation) or 'prompt_completion' "
            "(loss and KL on the continuation only)."
        },
    )
    dataset_limit: int | None = field(
        default=None, metadata={"help": "Use only the first N training records (after holding out)."}
    )
    heldout_size: int = field(
        default=RTP_HELDOUT_SIZE,
        metadata={
            "help": "RTP only: the last N records are held out from training and prompt sampling (evaluation "
            "uses them, as steer.eval.rtp.clean_heldout_texts does)."
        },
    )
    prompt_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts for guidance rounds: a dataset/file with a 'prompt' column. Default: the RTP prompts "
            "of the training records, or the training dataset's own 'prompt' column."
        },
    )
    prompt_limit: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    corpus_min_toxicity: float | None = field(
        default=None,
        metadata={
            "help": "RTP only: train on the records whose continuation's Perspective toxicity is >= this (a toxic "
            "corpus, whose drift the constraint must counter); None: all records."
        },
    )
    prompt_min_toxicity: float | None = field(
        default=None,
        metadata={
            "help": "RTP only: sample guidance rounds on the training records whose prompt's Perspective toxicity is "
            ">= this (challenging prompts elicit the violations the guidance model must learn); None: all."
        },
    )
    corpus_min_satisfaction: float | None = field(
        default=None,
        metadata={
            "help": "Train only on the records whose completion (RTP: continuation; else the 'completion' or "
            "'text' column) the run's constraint scores >= this: SFT on the corpus filtered to texts that satisfy "
            "the constraint, a baseline (with kl_coef 0) that needs no guidance model. None: every record."
        },
    )
    constraint: str = field(
        default="non_toxic",
        metadata={
            "help": f"The constraint: one of {sorted(CONSTRAINTS)} or 'package.module:Class' (a "
            "steer.constraints.Constraint subclass)."
        },
    )
    constraint_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'Keyword arguments of the constraint, e.g. {"backend": "profanity"} (JSON on the command line).'
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (True) or the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the policy adapter."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the policy adapter."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout of the policy adapter."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules the policy LoRA adapts (default: all linear layers)."}
    )
    prerequisites: list[dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": "Runs this one needs first (e.g. the adapters of kl_reference_adapter and policy_init_adapter), "
            "each a mapping of overrides of this same command that sets its own output_dir, e.g. "
            "[{output_dir: outputs/topic_sft, kl_coef: 0}]. The CLI trains, in order, each one whose output_dir "
            "holds no finished run yet (resuming from its newest checkpoint when it has one), then this run. JSON "
            "on the command line; [] skips them."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a previous run in output_dir: its artefacts (model or adapter, guidance/, checkpoints, "
            "logs) are moved to output_dir/.replaced-run when training starts and deleted once this run has "
            "saved, so only this run's files remain. Without it a run refuses an output_dir that holds another "
            "run's model, guidance/ or checkpoints (resuming from a checkpoint inside it is allowed)."
        },
    )

    def __post_init__(self) -> None:
        self.constraint_kwargs = constraint_kwargs(
            self.constraint_kwargs, "ConstrainedScriptArguments.constraint_kwargs"
        )
        self.prerequisites = prerequisite_runs(self.prerequisites, "ConstrainedScriptArguments.prerequisites")
        if self.dataset_format not in ("text", "prompt_completion"):
            raise ValueError(
                "ConstrainedScriptArguments.dataset_format must be 'text' or 'prompt_completion', "
                f"got {self.dataset_format!r}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(
                f"ConstrainedScriptArguments.dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}"
            )
        for name in ("corpus_min_toxicity", "prompt_min_toxicity", "corpus_min_satisfaction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"ConstrainedScriptArguments.{name} must be in [0, 1], got {value}")
        for name in ("dataset_limit", "prompt_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ConstrainedScriptArguments.{name} must be >= 1, got {value}")
        if self.heldout_size < 0:
            raise ValueError(f"ConstrainedScriptArguments.heldout_size must be >= 0, got {self.heldout_size}")
        if self.lora_r < 1:
            raise ValueError(f"ConstrainedScriptArguments.lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha < 1:
            raise ValueError(f"ConstrainedScriptArguments.lora_alpha must be >= 1, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"ConstrainedScriptArguments.lora_dropout must be in [0, 1), got {self.lora_dropout}"
            )
        if not self.constraint:
            raise ValueError(
                f"ConstrainedScriptArguments.constraint must be one of {sorted(CONSTRAINTS)} or 'module:Class'"
            )
        if not self.dataset_name:
            raise ValueError(
                "ConstrainedScriptArguments.dataset_name must be 'rtp', a data file or a hub dataset id"
            )

    def peft_config(self):
        if not self.use_peft:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules) if self.lora_target_modules else "all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        )


def _constraint_of(script_args: ConstrainedScriptArguments) -> Constraint:
    """The constraint of a run: ``constraint`` and ``constraint_kwargs`` through the registry
    (:func:`steer.constraints.build_constraint`); every failure is one line naming the field."""
    kwargs = script_args.constraint_kwargs or {}
    hint = ""
    if script_args.constraint == "detoxify" or kwargs.get("backend") == "detoxify":
        hint = (
            '; offline, pass constraint_kwargs {"backend": "detoxify", "checkpoint": "<local .ckpt>", '
            '"config_dir": "<its Hugging Face config + tokenizer dir>"}'
        )
    return build_constraint(
        script_args.constraint,
        kwargs,
        field="ConstrainedScriptArguments.constraint",
        kwargs_field="ConstrainedScriptArguments.constraint_kwargs",
        load_hint=hint,
    )


def _load_table(name: str, split: str, what: str) -> Dataset:
    from steer.data import load_table

    return load_table(name, split, what=f"ConstrainedScriptArguments.{what}")


def _check_prompts(dataset: Dataset, what: str) -> None:
    """A prompt dataset has a 'prompt' column of non-empty strings (else one line naming the row)."""
    if "prompt" not in dataset.column_names:
        raise UserInputError(
            f"{what} has no 'prompt' column to sample from (columns: {dataset.column_names})"
        )
    for row, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserInputError(f"{what}: row {row} has no prompt text ('prompt' = {prompt!r:.60})")


def _check_training_columns(dataset: Dataset, what: str) -> None:
    columns = set(dataset.column_names)
    if "text" in columns or {"prompt", "completion"} <= columns or "messages" in columns:
        return
    raise UserInputError(
        f"{what} has columns {sorted(columns)}; training needs 'text', 'prompt' + 'completion', or 'messages'"
    )


def load_constrained_datasets(
    script_args: ConstrainedScriptArguments,
) -> tuple[Dataset, Dataset, Dataset | None]:
    """``(train_dataset, prompt_dataset, heldout)`` for a constrained run (``heldout``: RTP records, or None)."""
    from steer.data import load_rtp

    heldout = None
    if script_args.dataset_name == "rtp":
        records = load_rtp()
        n_train = len(records) - script_args.heldout_size
        if n_train < 1:
            raise UserInputError(
                f"ConstrainedScriptArguments.heldout_size={script_args.heldout_size} leaves no RTP training records "
                f"(only {len(records)} available)"
            )
        heldout = records.select(range(n_train, len(records))) if script_args.heldout_size else None
        pool = records.select(range(n_train))

        def toxicity(part: str, minimum: float | None) -> list[int]:
            if minimum is None:
                return list(range(len(pool)))
            return [i for i, r in enumerate(pool[part]) if ((r or {}).get("toxicity") or 0.0) >= minimum]

        keep = toxicity("continuation", script_args.corpus_min_toxicity)
        if not keep:
            raise UserInputError(
                f"ConstrainedScriptArguments.corpus_min_toxicity={script_args.corpus_min_toxicity} keeps no RTP record"
            )
        records = pool.select(keep[: script_args.dataset_limit or len(keep)])
        prompts = [p["text"] for p in records["prompt"]]
        completions = [c["text"] for c in records["continuation"]]
        if script_args.dataset_format == "text":
            train = Dataset.from_dict({"text": [p + c for p, c in zip(prompts, completions)]})
        else:
            train = Dataset.from_dict({"prompt": prompts, "completion": completions})
        if script_args.prompt_min_toxicity is None:  # the training records' own prompts
            prompt_dataset = Dataset.from_dict({"prompt": prompts})
        else:  # challenging prompts from every training-side record (never the held-out ones)
            sampled = toxicity("prompt", script_args.prompt_min_toxicity)
            if not sampled:
                raise UserInputError(
                    f"ConstrainedScriptArguments.prompt_min_toxicity={script_args.prompt_min_toxicity} keeps no "
                    "RTP prompt"
                )
            prompt_dataset = Dataset.from_dict({"prompt": [pool[i]["prompt"]["text"] for i in sampled]})
    else:
        train = _load_table(script_args.dataset_name, script_args.dataset_split, "dataset_name")
        _check_training_columns(
            train, f"ConstrainedScriptArguments.dataset_name={script_args.dataset_name!r}"
        )
        if script_args.dataset_limit:
            train = train.select(range(min(script_args.dataset_limit, len(train))))
        prompt_dataset = None
        if script_args.prompt_dataset_name is None:
            if "prompt" not in train.column_names:
                raise UserInputError(
                    f"ConstrainedScriptArguments.dataset_name={script_args.dataset_name!r} has no 'prompt' column "
                    f"to sample guidance rounds from (columns: {train.column_names}); set prompt_dataset_name"
                )
            prompt_dataset = train.select_columns(["prompt"])
    if script_args.prompt_dataset_name is not None:
        prompt_dataset = _load_table(
            script_args.prompt_dataset_name, script_args.dataset_split, "prompt_dataset_name"
        )
    if script_args.prompt_limit:
        prompt_dataset = prompt_dataset.select(range(min(script_args.prompt_limit, len(prompt_dataset))))
    where = (
        f"ConstrainedScriptArguments.prompt_dataset_name={script_args.prompt_dataset_name!r}"
        if script_args.prompt_dataset_name is not None
        else f"the prompts of dataset_name={script_args.dataset_name!r}"
    )
    _check_prompts(prompt_dataset, where)
    return train, prompt_dataset, heldout


def check_constrained_config(
    script_args: ConstrainedScriptArguments, training_args: ConstrainedConfig
) -> None:
    """Settings of the two configs that cannot train together (one line naming both fields)."""
    if not script_args.use_peft:
        if training_args.guidance_backbone == "lora":
            raise UserInputError(
                "ConstrainedScriptArguments.use_peft=false trains the full model, but "
                "ConstrainedConfig.guidance_backbone='lora' puts the guidance adapter on the policy's frozen base "
                "weights; set guidance_backbone separate (or use_peft true)"
            )
        if training_args.policy_export_weight < 1 and training_args.kl_coef > 0:
            raise UserInputError(
                "ConstrainedScriptArguments.use_peft=false trains the full model, but ConstrainedConfig."
                "policy_export_weight interpolates LoRA adapters; set policy_export_weight 1 (or use_peft true)"
            )
        if training_args.kl_reference == "base":
            raise UserInputError(
                "ConstrainedScriptArguments.use_peft=false trains the full model, but ConstrainedConfig."
                "kl_reference='base' needs the base under a PEFT adapter; set kl_reference policy (or use_peft true)"
            )
    for name in ("kl_reference_adapter", "policy_init_adapter"):
        adapter = getattr(training_args, name)
        if (
            adapter is not None
            and training_args.kl_coef > 0
            and not (Path(adapter).expanduser() / "adapter_config.json").is_file()
        ):
            raise UserInputError(
                f"ConstrainedConfig.{name}={adapter!r} is not a PEFT adapter directory (no adapter_config.json "
                "there); point it at a finished run's output_dir, e.g. the plain-SFT twin's"
            )


def check_constrained_run(
    script_args: ConstrainedScriptArguments, training_args: ConstrainedConfig
) -> tuple[str | None, Dataset, Dataset, Constraint]:
    """Everything a run can check before its model loads, in the order a user fixes it.

    The settings that cannot train together, the resume path (``True``/``"latest"``: the newest checkpoint of
    ``output_dir``), the output directory (no previous run unless ``overwrite_output_dir`` or resuming inside
    it), the model path, the constraint and its kwargs, the data files and their columns. Returns ``(resume
    path, train, prompts, constraint)``; :func:`check_constrained_model` then checks what needs the model's
    config and tokenizer.
    """
    from steer.models import check_model_dir

    check_constrained_config(script_args, training_args)
    resume = resolve_resume(
        training_args.resume_from_checkpoint,
        training_args.output_dir,
        owner="ConstrainedConfig",
        state_files=(STATE_NAME, "constrained_state_rank*.pt"),
    )
    check_output_dir(
        training_args.output_dir,
        overwrite=script_args.overwrite_output_dir,
        resume=resume,
        owner="ConstrainedScriptArguments",
    )
    check_model_dir(script_args.model_name_or_path, what="ConstrainedScriptArguments.model_name_or_path")
    constraint = _constraint_of(script_args)
    train, prompt_dataset, _ = load_constrained_datasets(script_args)
    if script_args.corpus_min_satisfaction is not None:
        train = filter_by_constraint(train, constraint, script_args.corpus_min_satisfaction)
    return resume, train, prompt_dataset, constraint


def filter_by_constraint(train: Dataset, constraint: Constraint, minimum: float) -> Dataset:
    """The records of ``train`` whose completion (``'completion'``, else ``'text'``) ``constraint`` scores
    ``>= minimum`` (texts it could not score are dropped); one line when none is kept."""
    from steer.guidance.sampling import score_texts

    what = "ConstrainedScriptArguments.corpus_min_satisfaction"
    column = next((c for c in ("completion", "text") if c in train.column_names), None)
    if column is None:
        raise UserInputError(
            f"{what} scores the 'completion' or 'text' column; the training data has {train.column_names}"
        )
    texts = [t if isinstance(t, str) else "" for t in train[column]]
    scores = score_texts(constraint, texts, desc=f"filtering the corpus ({constraint.name})")
    keep = ((scores.probs >= minimum) & scores.valid).nonzero().view(-1).tolist()
    if not keep:
        raise UserInputError(
            f"{what}={minimum} keeps none of the {len(texts)} training records (constraint {constraint.name!r} "
            f"on their {column!r}; the highest score is {float(scores.probs.max()) if texts else float('nan'):.3f})"
        )
    logger.info(
        "corpus filtered by %s >= %s: %d of %d training records kept",
        constraint.name,
        minimum,
        len(keep),
        len(texts),
    )
    return train.select(keep)


def _trainable_tokens(train: Dataset, tokenizer, max_length: int, limit: int = 2048) -> tuple[int, int, int]:
    """(samples checked, samples that keep a trained token after truncation to ``max_length``, shortest prompt)."""
    rows = train.select(range(min(limit, len(train))))
    if "prompt" in rows.column_names and "completion" in rows.column_names:
        prompts = [p if isinstance(p, str) else "" for p in rows["prompt"]]
        lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        return len(lengths), sum(n < max_length for n in lengths), min(lengths, default=0)
    return len(rows), len(rows) if max_length >= 2 else 0, 0


def check_constrained_model(
    script_args: ConstrainedScriptArguments,
    training_args: ConstrainedConfig,
    train: Dataset,
    prompts: Dataset,
) -> Dataset:
    """What needs the model's config and tokenizer but not its weights; returns the guidance prompts to use.

    - every ``lora_target_modules`` entry names a module of the model (PEFT's rule: the name or its suffix);
    - ``max_length`` leaves at least one trained token in some training sample (``prompt_completion``: a
      prompt shorter than ``max_length``; else ``max_length >= 2``);
    - guidance-round prompts longer than the sampling budget (the model's context minus
      ``sample_max_new_tokens``) are cut on the left, keeping their end; the count is logged.

    A model whose config cannot be read here (a hub id offline, ...) skips these checks: loading it reports why.
    """
    from steer.data import prompt_budget, truncate_prompts
    from steer.errors import ModelLoadError
    from steer.models import (
        context_length,
        load_model_config,
        load_tokenizer,
        module_names,
        unknown_target_modules,
    )

    name = script_args.model_name_or_path
    try:
        config = load_model_config(name, trust_remote_code=training_args.trust_remote_code)
        tokenizer = load_tokenizer(name)
    except (ModelLoadError, OSError, ValueError) as err:
        logger.info("pre-flight model checks skipped (%s)", first_line(err))
        return prompts
    if script_args.use_peft and script_args.lora_target_modules:
        try:
            names = module_names(config, trust_remote_code=training_args.trust_remote_code)
        except (ValueError, OSError, ImportError) as err:  # an architecture that cannot be built empty
            logger.info("LoRA target check skipped (%s)", first_line(err))
            names = None
        unknown = unknown_target_modules(script_args.lora_target_modules, names) if names else []
        if unknown:
            leaves = sorted(
                {n.rsplit(".", 1)[-1] for n in names if "." in n and not n.rsplit(".", 1)[-1].isdigit()}
            )
            raise UserInputError(
                f"ConstrainedScriptArguments.lora_target_modules: {unknown} match no module of {name} "
                f"(its module names end in: {', '.join(leaves[:24])})"
            )
    max_length = training_args.max_length
    if max_length is not None:
        checked, usable, shortest = _trainable_tokens(train, tokenizer, max_length)
        if checked and not usable:
            detail = f" (the shortest prompt has {shortest} tokens)" if shortest else ""
            raise UserInputError(
                f"ConstrainedConfig.max_length={max_length} leaves no trained token in any of the first {checked} "
                f"training samples{detail}; raise max_length"
            )
    try:
        budget = prompt_budget(context_length(config, tokenizer), training_args.sample_max_new_tokens)
    except UserInputError as err:
        raise UserInputError(f"ConstrainedConfig.sample_max_new_tokens: {err}") from None
    texts, cut = truncate_prompts(list(prompts["prompt"]), tokenizer, budget)
    if cut:
        logger.warning(
            "guidance prompts: %d of %d are longer than the sampling budget of %d tokens (the model's context "
            "minus sample_max_new_tokens=%d) and were cut on the left, keeping their end",
            cut,
            len(texts),
            budget,
            training_args.sample_max_new_tokens,
        )
        prompts = Dataset.from_dict({"prompt": texts})
    return prompts


def _raised_by(err: BaseException, obj: Any) -> bool:
    """Whether ``err`` was raised inside a method of ``obj`` (a frame whose ``self`` is ``obj``)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_locals.get("self") is obj:
            return True
        tb = tb.tb_next
    return False


def _build_trainer(constraint: Constraint, **kwargs) -> ConstrainedTrainer:
    """The trainer; an error of the constraint while it scores the vocabulary and the context-prior word list
    (before any training step) is one line naming the constraint."""
    from steer.models import quiet_adapter_load

    try:
        with quiet_adapter_load():  # the trainer puts the policy's LoRA adapter on the model
            return ConstrainedTrainer(constraint=constraint, **kwargs)
    except UserInputError:
        raise
    except Exception as err:
        if not _raised_by(err, constraint):
            raise
        raise UserInputError(
            f"constraint {constraint.name!r} failed while scoring the token prior / context-prior word list before "
            f"training ({type(err).__name__}: {first_line(err)}); check ConstrainedScriptArguments.constraint_kwargs, "
            "or set ConstrainedConfig.guidance_context_prior none"
        ) from err


def train_constrained(
    script_args: ConstrainedScriptArguments, training_args: ConstrainedConfig, *, callbacks=None
):
    """Check the inputs (:func:`check_constrained_run`, :func:`check_constrained_model`), load the model, train,
    and save the policy adapter + ``guidance/`` + ``base_model.json`` to ``output_dir``.

    Returns the trainer. ``training_args.resume_from_checkpoint`` resumes a run (a checkpoint path, or
    ``true`` for the newest checkpoint in ``output_dir``). With ``overwrite_output_dir`` the previous run's
    artefacts make way for this run's (:func:`steer.scripts.output.replacing_previous_run`).
    """
    from steer.io import atomic_write_json
    from steer.models import BASE_MODEL_FILE, base_model_record, load_causal_lm

    resume, train, prompt_dataset, constraint = check_constrained_run(script_args, training_args)
    prompt_dataset = check_constrained_model(script_args, training_args, train, prompt_dataset)
    dtype = None if script_args.dtype == "auto" else script_args.dtype
    model, tokenizer = load_causal_lm(
        script_args.model_name_or_path, dtype=dtype, trust_remote_code=training_args.trust_remote_code
    )
    from steer.trainers.sharding import zero3_gathered

    with zero3_gathered(model.get_input_embeddings().parameters()):  # ZeRO-3 may partition at load
        record = base_model_record(model)  # before any adapter: the base this run's adapter belongs to
    record["name_or_path"] = str(script_args.model_name_or_path)
    trainer = _build_trainer(
        constraint,
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=script_args.peft_config(),
        prompt_dataset=prompt_dataset,
        callbacks=callbacks,
    )
    with training_run(
        training_args.output_dir,
        overwrite=script_args.overwrite_output_dir,
        resume=resume,
        is_main=training_args.should_save,
    ):
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(training_args.output_dir)
        if training_args.should_save and script_args.use_peft:
            atomic_write_json(f"{training_args.output_dir}/{BASE_MODEL_FILE}", record)
            if training_args.kl_coef > 0 and training_args.policy_export_weight < 1:
                from steer.interpolation import export_interpolated_policy

                start = training_args.policy_init_adapter or training_args.kl_reference_adapter
                export_interpolated_policy(
                    training_args.output_dir, start, training_args.policy_export_weight
                )
    return trainer
