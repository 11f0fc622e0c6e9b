"""``steer train constrained``: the recipe runner (what to train on, the constraint, load → train → save).

The trainer and its config live in :mod:`steer.trainers.constrained`; this module holds what a recipe adds around
them: :class:`ConstrainedScriptArguments` (model, corpus, prompts, constraint, LoRA), the constraint registry,
dataset loading (RTP with its held-out tail, or any local/hub table) and :func:`train_constrained`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from steer.constraints import Constraint
from steer.data import RTP_HELDOUT_SIZE
from steer.trainers.constrained import ConstrainedConfig, ConstrainedTrainer

__all__ = [
    "CONSTRAINTS",
    "ConstrainedConfig",
    "ConstrainedScriptArguments",
    "build_constraint",
    "load_constrained_datasets",
    "train_constrained",
]

CONSTRAINTS = {
    "non_toxic": "steer.constraints:NonToxic",
    "keyword": "steer.constraints:KeywordConstraint",
    "classifier": "steer.constraints:ClassifierConstraint",
}


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
            "uses them, as steer.eval.toxicity.clean_heldout_texts does)."
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

    def __post_init__(self) -> None:
        if isinstance(self.constraint_kwargs, str):
            try:
                self.constraint_kwargs = json.loads(self.constraint_kwargs) if self.constraint_kwargs else {}
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"ConstrainedScriptArguments.constraint_kwargs is not valid JSON: {err}"
                ) from err
        if self.constraint_kwargs is None:
            self.constraint_kwargs = {}
        if not isinstance(self.constraint_kwargs, dict):
            raise ValueError(
                "ConstrainedScriptArguments.constraint_kwargs must be a mapping, got "
                f"{type(self.constraint_kwargs).__name__}"
            )
        if self.dataset_format not in ("text", "prompt_completion"):
            raise ValueError(
                "ConstrainedScriptArguments.dataset_format must be 'text' or 'prompt_completion', "
                f"got {self.dataset_format!r}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(
                f"ConstrainedScriptArguments.dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}"
            )
        for name in ("corpus_min_toxicity", "prompt_min_toxicity"):
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


def build_constraint(name: str, kwargs: dict[str, Any] | None = None) -> Constraint:
    """A constraint from its short name (``non_toxic``, ``keyword``, ``classifier``) or ``module:Class``."""
    import importlib

    target = CONSTRAINTS.get(name, name)
    if ":" not in target:
        raise ValueError(
            f"unknown constraint {name!r}; choose one of {sorted(CONSTRAINTS)} or 'package.module:Class'"
        )
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import constraint {target!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Constraint)):
        raise ValueError(f"constraint {target!r} is not a steer.constraints.Constraint subclass")
    try:
        return cls(**(kwargs or {}))
    except TypeError as err:
        raise ValueError(f"bad constraint_kwargs for {target!r}: {err}") from err


def _load_table(name: str, split: str) -> Dataset:
    from datasets import load_dataset

    path = Path(name).expanduser()
    if path.is_file():
        kind = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: unsupported dataset file type (use .json, .jsonl, .csv or .parquet)")
        return load_dataset(kind, data_files=str(path), split="train")
    return load_dataset(name, split=split)


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
            raise ValueError(
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
            raise ValueError(
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
                raise ValueError(
                    f"ConstrainedScriptArguments.prompt_min_toxicity={script_args.prompt_min_toxicity} keeps no "
                    "RTP prompt"
                )
            prompt_dataset = Dataset.from_dict({"prompt": [pool[i]["prompt"]["text"] for i in sampled]})
    else:
        train = _load_table(script_args.dataset_name, script_args.dataset_split)
        if script_args.dataset_limit:
            train = train.select(range(min(script_args.dataset_limit, len(train))))
        prompt_dataset = None
        if script_args.prompt_dataset_name is None:
            if "prompt" not in train.column_names:
                raise ValueError(
                    f"dataset {script_args.dataset_name!r} has no 'prompt' column to sample from (columns: "
                    f"{train.column_names}); set prompt_dataset_name"
                )
            prompt_dataset = train.select_columns(["prompt"])
    if script_args.prompt_dataset_name is not None:
        prompt_dataset = _load_table(script_args.prompt_dataset_name, script_args.dataset_split)
        if "prompt" not in prompt_dataset.column_names:
            raise ValueError(
                f"prompt dataset {script_args.prompt_dataset_name!r} has no 'prompt' column "
                f"(columns: {prompt_dataset.column_names})"
            )
    if script_args.prompt_limit:
        prompt_dataset = prompt_dataset.select(range(min(script_args.prompt_limit, len(prompt_dataset))))
    return train, prompt_dataset, heldout


def train_constrained(
    script_args: ConstrainedScriptArguments, training_args: ConstrainedConfig, *, callbacks=None
):
    """Load model, data and constraint, train, and save the policy adapter + ``guidance/`` to ``output_dir``.

    Returns the trainer. ``training_args.resume_from_checkpoint`` resumes a run.
    """
    from steer.models import load_causal_lm

    dtype = None if script_args.dtype == "auto" else script_args.dtype
    model, tokenizer = load_causal_lm(
        script_args.model_name_or_path, dtype=dtype, trust_remote_code=training_args.trust_remote_code
    )
    train, prompt_dataset, _ = load_constrained_datasets(script_args)
    constraint = build_constraint(script_args.constraint, script_args.constraint_kwargs)
    trainer = ConstrainedTrainer(
        model,
        training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=script_args.peft_config(),
        constraint=constraint,
        prompt_dataset=prompt_dataset,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer
