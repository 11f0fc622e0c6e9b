"""``steer train oracle``: a contextual toxicity oracle trained by steer, offline.

A sequence classifier (by default the embedded SmolLM2-135M with a two-class score head and a LoRA adapter) is
fine-tuned on the Perspective labels shipped with RealToxicityPrompts: every prompt and continuation text of the
training records is one example, toxic when its Perspective ``attribute`` score is >= ``label_threshold``.

The split follows the detox recipe: the last ``heldout_size`` RTP records (what ``steer eval toxicity``
evaluates on) never reach training; ``validation_size`` records drawn (seeded) from the rest choose the
training point (the evaluation with the best validation AUC); the others train. The held-out texts are only
scored once, at the end, for the report: AUC against Perspective with a 95% bootstrap interval over records,
next to alt-profanity-check's AUC on the same texts.

The result is an ordinary ``AutoModelForSequenceClassification`` directory (LoRA merged, safetensors,
``id2label = {0: "non_toxic", 1: "toxic"}``) plus ``oracle.json`` (settings, split, metrics). It loads with::

    ClassifierConstraint("outputs/toxicity_oracle", positive_label="non_toxic")        # P(satisfied)
    steer eval toxicity --oracle classifier --oracle_checkpoint outputs/toxicity_oracle --oracle_label toxic

and in a recipe as ``constraint: classifier`` with ``constraint_kwargs: {model_name_or_path: ...,
positive_label: non_toxic}``. A directory that already holds a finished oracle with the same settings and data
is kept (the run says so and stops).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainingArguments

from steer.data import RTP_HELDOUT_SIZE
from steer.errors import ModelLoadError, UserInputError, first_line
from steer.eval.agreement import accuracy_f1, auc_with_interval

logger = logging.getLogger(__name__)

__all__ = [
    "LABELS",
    "ORACLE_FILE",
    "OracleScriptArguments",
    "OracleTrainingArguments",
    "OracleSplit",
    "check_oracle_output_dir",
    "oracle_settings",
    "oracle_split",
    "record_texts",
    "train_oracle",
]

ORACLE_FILE = "oracle.json"
ORACLE_SCHEMA = "steer.toxicity_oracle/v1"
LABELS = ("non_toxic", "toxic")  # id2label of the saved classifier: index 1 is the toxic class
TEXT_FIELDS = ("prompt", "continuation")
_OWNER = "OracleScriptArguments"
# Training settings that decide the model (a cached oracle is reused only when all of them match).
_TRAINING_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "max_grad_norm",
    "optim",
    "seed",
    "eval_strategy",
    "eval_steps",
)


@dataclass
class OracleScriptArguments:
    """What the toxicity oracle is trained on and how it is split (the trainer's knobs: OracleTrainingArguments)."""

    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={
            "help": "Backbone of the classifier: the embedded 'smollm2-135m', a local model directory, a .gguf "
            "file or a hub id (a score head with two labels is put on it)."
        },
    )
    dataset_name: str = field(
        default="rtp",
        metadata={
            "help": "Labelled texts: 'rtp' (RealToxicityPrompts with its Perspective scores; read from "
            "STEER_DATA_DIR when present, else allenai/real-toxicity-prompts) or a local .jsonl file of RTP "
            "records ({'prompt': {'text': ..., 'toxicity': ...}, 'continuation': {...}} a line)."
        },
    )
    heldout_size: int = field(
        default=RTP_HELDOUT_SIZE,
        metadata={
            "help": "The last N records are held out: never trained or validated on, scored once for the "
            "report (the detox recipe and steer eval toxicity hold out the same tail)."
        },
    )
    validation_size: int = field(
        default=400,
        metadata={
            "help": "Records drawn (seeded by split_seed) from the training records to choose the training point "
            "on (the evaluation with the best validation AUC); 0: no validation, the last step is kept."
        },
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the validation draw."})
    text_fields: list[str] = field(
        default_factory=lambda: list(TEXT_FIELDS),
        metadata={"help": "Which texts of a record are examples: prompt, continuation or both."},
    )
    attribute: str = field(
        default="toxicity",
        metadata={
            "help": "The Perspective score that labels a text (toxicity, severe_toxicity, insult, ...)."
        },
    )
    label_threshold: float = field(
        default=0.5,
        metadata={"help": "A text is toxic when its Perspective score is >= this."},
    )
    max_length: int = field(
        default=64, metadata={"help": "Texts are cut to this many tokens in training and scoring."}
    )
    train_limit: int | None = field(
        default=None,
        metadata={
            "help": "Train on the first N training records only (after the held-out and validation split)."
        },
    )
    lora_r: int = field(
        default=16, metadata={"help": "LoRA rank of the adapter (merged into the saved model)."}
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the adapter."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout of the adapter."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules the LoRA adapts (default: all linear layers); the score head is trained fully."
        },
    )
    compare_profanity: bool = field(
        default=True,
        metadata={"help": "Also score the held-out texts with alt-profanity-check (the offline baseline)."},
    )
    bootstrap_samples: int = field(
        default=2000,
        metadata={
            "help": "Bootstrap resamples (of held-out records) for the 95-percent intervals of the AUCs."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace what output_dir holds (another oracle, or other files). Without it an oracle with "
            "the same settings and data is kept and anything else is refused."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.text_fields, str):
            self.text_fields = [self.text_fields]
        self.text_fields = list(self.text_fields or [])
        unknown = [name for name in self.text_fields if name not in TEXT_FIELDS]
        if not self.text_fields or unknown:
            raise ValueError(
                f"{_OWNER}.text_fields must name prompt and/or continuation, got {self.text_fields!r}"
            )
        if len(set(self.text_fields)) != len(self.text_fields):
            raise ValueError(f"{_OWNER}.text_fields names a field twice: {self.text_fields!r}")
        if not self.model_name_or_path:
            raise ValueError(f"{_OWNER}.model_name_or_path must name a model")
        if not self.dataset_name:
            raise ValueError(f"{_OWNER}.dataset_name must be 'rtp' or a .jsonl file of RTP records")
        if not self.attribute:
            raise ValueError(f"{_OWNER}.attribute must name a Perspective score (e.g. toxicity)")
        for name in ("heldout_size", "validation_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_OWNER}.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.label_threshold <= 1.0:
            raise ValueError(f"{_OWNER}.label_threshold must be in (0, 1], got {self.label_threshold}")
        if self.max_length < 2:
            raise ValueError(f"{_OWNER}.max_length must be >= 2, got {self.max_length}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"{_OWNER}.train_limit must be >= 1 (or unset), got {self.train_limit}")
        if self.lora_r < 1:
            raise ValueError(f"{_OWNER}.lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha < 1:
            raise ValueError(f"{_OWNER}.lora_alpha must be >= 1, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{_OWNER}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bootstrap_samples < 0:
            raise ValueError(f"{_OWNER}.bootstrap_samples must be >= 0, got {self.bootstrap_samples}")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules) if self.lora_target_modules else "all-linear",
            bias="none",
            task_type="SEQ_CLS",  # PEFT trains the score head fully (modules_to_save)
        )


@dataclass
class OracleTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with defaults sized for the oracle on one CPU core."""

    output_dir: str | None = field(
        default="outputs/toxicity_oracle",
        metadata={"help": "Where the classifier directory (model, tokenizer, oracle.json) is written."},
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the training texts."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training texts per step."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Texts per validation batch."})
    learning_rate: float = field(
        default=2e-4, metadata={"help": "Learning rate of the LoRA adapter and head."}
    )
    eval_strategy: str = field(
        default="epoch",
        metadata={
            "help": "When the validation AUC is measured: 'epoch', 'steps' (every eval_steps) or 'no'."
        },
    )
    save_strategy: str = field(
        default="no",
        metadata={"help": "Trainer checkpoints are not kept (the oracle is saved once, at the end): 'no'."},
    )
    logging_steps: float = field(default=20, metadata={"help": "Log the training loss every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the head's initialisation and the data order."})


# --------------------------------------------------------------------------------------------------
# Data: records -> labelled texts, and the split
# --------------------------------------------------------------------------------------------------


@dataclass
class OracleSplit:
    """Labelled texts of one part of the split: ``record`` is each text's record index in the dataset."""

    name: str
    texts: list[str]
    labels: list[int]
    record: list[int]
    num_records: int
    num_unlabelled: int = 0  # texts without a score (Perspective failed on them) or without any text

    @property
    def positives(self) -> int:
        return int(sum(self.labels))

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.num_records,
            "texts": len(self.texts),
            "toxic": self.positives,
            "unlabelled_texts_skipped": self.num_unlabelled,
            "sha256": hashlib.sha256(json.dumps([self.texts, self.labels, self.record]).encode()).hexdigest()[
                :16
            ],
        }


def _score_of(value: Any, attribute: str, where: str) -> float | None:
    """A text's Perspective score: a float in [0, 1], or None when it has none (null / NaN)."""
    score = value.get(attribute) if isinstance(value, dict) else None
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
        raise UserInputError(f"{where}: {attribute}={score!r} is not a Perspective score in [0, 1]")
    return float(score)


def record_texts(
    dataset, indices: list[int], *, name: str, fields: list[str], attribute: str, threshold: float
) -> OracleSplit:
    """The labelled texts of the records ``indices`` of ``dataset`` (its ``fields`` texts, labelled toxic when
    their ``attribute`` score is >= ``threshold``); texts without a score are counted and skipped."""
    texts, labels, record, unlabelled = [], [], [], 0
    columns = {part: dataset[part] for part in fields}
    for index in indices:
        for part in fields:
            value = columns[part][index]
            score = _score_of(value, attribute, f"RTP record {index} {part}")
            text = value.get("text") if isinstance(value, dict) else None
            if score is None or not isinstance(text, str) or not text.strip():
                unlabelled += 1
                continue
            texts.append(text)
            labels.append(int(score >= threshold))
            record.append(index)
    return OracleSplit(name, texts, labels, record, len(indices), unlabelled)


def _load_records(script_args: OracleScriptArguments):
    from steer.data import check_rtp_records, load_rtp, load_table

    if script_args.dataset_name == "rtp":
        return load_rtp()
    path = Path(script_args.dataset_name).expanduser()
    if path.suffix not in (".jsonl", ".json"):
        raise UserInputError(
            f"{_OWNER}.dataset_name={script_args.dataset_name!r}: expected 'rtp' or a .jsonl file of RTP records"
        )
    dataset = load_table(script_args.dataset_name, what=f"{_OWNER}.dataset_name")
    check_rtp_records(dataset, [path])
    return dataset


def oracle_split(script_args: OracleScriptArguments, dataset=None) -> dict[str, OracleSplit]:
    """``{"train", "validation", "heldout"}`` labelled texts of the RTP records (``dataset``, default: the
    records ``dataset_name`` names). Held out: the last ``heldout_size`` records; validation: ``validation_size``
    records drawn with ``split_seed`` from the others; train: the rest (the first ``train_limit``).

    One-line errors: no record has a score for ``attribute``, a part left without texts, a part whose labels
    are all alike (no AUC).
    """
    if dataset is None:
        dataset = _load_records(script_args)
    n = len(dataset)
    pool = n - script_args.heldout_size
    if pool - script_args.validation_size < 1:
        raise UserInputError(
            f"{_OWNER}.heldout_size={script_args.heldout_size} and validation_size={script_args.validation_size} "
            f"leave no training record (the dataset has {n})"
        )
    order = np.random.default_rng(script_args.split_seed).permutation(pool).tolist()
    validation = sorted(order[: script_args.validation_size])
    train = sorted(order[script_args.validation_size :])
    if script_args.train_limit is not None:
        train = train[: script_args.train_limit]
    parts = {
        "train": train,
        "validation": validation,
        "heldout": list(range(pool, n)),
    }
    common = {
        "fields": script_args.text_fields,
        "attribute": script_args.attribute,
        "threshold": script_args.label_threshold,
    }
    split = {name: record_texts(dataset, indices, name=name, **common) for name, indices in parts.items()}
    if not any(part.texts for part in split.values()):
        raise UserInputError(
            f"{_OWNER}.attribute={script_args.attribute!r}: no {'/'.join(script_args.text_fields)} text of the "
            f"{n} records has that Perspective score; the oracle needs RTP records with Perspective scores"
        )
    for name, part in split.items():
        if name == "validation" and not script_args.validation_size:
            continue
        if name == "heldout" and not script_args.heldout_size:
            continue
        if not part.texts:
            raise UserInputError(
                f"the {name} part ({part.num_records} records) has no text with a {script_args.attribute!r} "
                "score; change heldout_size / validation_size or the data"
            )
        if part.positives in (0, len(part.texts)):
            kind = "toxic" if part.positives else "non-toxic"
            raise UserInputError(
                f"every {name} text ({len(part.texts)}) is {kind} at {_OWNER}.label_threshold="
                f"{script_args.label_threshold}; the oracle needs both kinds to learn and be measured"
            )
    return split


# --------------------------------------------------------------------------------------------------
# Output directory and cache
# --------------------------------------------------------------------------------------------------


def oracle_settings(
    script_args: OracleScriptArguments, training_args: TrainingArguments, split: dict[str, OracleSplit]
) -> dict[str, Any]:
    """Everything that decides the trained oracle: the script settings, the training settings that matter and
    a digest of every part of the split (a changed data file is a different oracle)."""
    script = dataclasses.asdict(script_args)
    for key in ("overwrite_output_dir", "compare_profanity", "bootstrap_samples"):
        script.pop(key)
    training = {}
    for key in _TRAINING_KEYS:
        value = getattr(training_args, key, None)
        training[key] = getattr(value, "value", value)
    return {
        "script": script,
        "training": training,
        "data": {name: part.summary()["sha256"] for name, part in split.items()},
    }


def _settings_differ(old: dict, new: dict) -> list[str]:
    out = []
    for group in ("script", "training", "data"):
        a, b = old.get(group) or {}, new.get(group) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    return out


def _finished_oracle(directory: Path) -> dict | None:
    """The ``oracle.json`` of a finished oracle in ``directory`` (with its config and weights), else None."""
    path = directory / ORACLE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("schema") != ORACLE_SCHEMA:
        return None
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        return None
    return record


def check_oracle_output_dir(
    output_dir: str | None, settings: dict[str, Any], *, overwrite: bool
) -> dict[str, Any] | None:
    """The finished oracle's ``oracle.json`` when ``output_dir`` holds one with these ``settings`` (and not
    ``overwrite``); None when training should run. One line when ``output_dir`` holds something else."""
    from steer.io import check_writable_dir

    if not output_dir:
        raise UserInputError(
            "OracleTrainingArguments.output_dir must name the directory to save the oracle in"
        )
    directory = Path(output_dir).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserInputError(f"OracleTrainingArguments.output_dir {directory} exists and is not a directory")
    if directory.is_dir() and not overwrite:
        finished = _finished_oracle(directory)
        if finished is not None:
            differ = _settings_differ(finished.get("settings") or {}, settings)
            if not differ:
                return finished
            raise UserInputError(
                f"output_dir {directory} holds an oracle trained with other settings ({'; '.join(differ[:4])}); "
                f"set {_OWNER}.overwrite_output_dir true to replace it, or choose another output_dir"
            )
        entries = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
        if entries:
            raise UserInputError(
                f"output_dir {directory} holds other files ({', '.join(entries[:5])}) but no finished oracle; set "
                f"{_OWNER}.overwrite_output_dir true to replace them, or choose another output_dir"
            )
    check_writable_dir(directory.parent, what="OracleTrainingArguments.output_dir: parent directory")
    return None


# --------------------------------------------------------------------------------------------------
# Model, training, scoring
# --------------------------------------------------------------------------------------------------


def load_classifier(script_args: OracleScriptArguments, *, dtype=None):
    """``(model, tokenizer)``: ``model_name_or_path`` with an untrained two-label score head (``LABELS``) and a
    pad token (decoder classifiers find each text's last token by it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from steer.models import check_model_dir, resolve_model_path

    name = script_args.model_name_or_path
    check_model_dir(name, what=f"{_OWNER}.model_name_or_path")
    try:
        path = resolve_model_path(name)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"{_OWNER}.model_name_or_path={name!r} could not be loaded: {first_line(err)}"
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"{_OWNER}.model_name_or_path={name!r}: its tokenizer has neither a pad nor an eos token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)},
            pad_token_id=tokenizer.pad_token_id,
            problem_type="single_label_classification",
            dtype=dtype or torch.float32,
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"{_OWNER}.model_name_or_path={name!r}: no sequence classifier can be built on it ({first_line(err)})"
        ) from err
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _tokenized(split: OracleSplit, tokenizer, max_length: int):
    from datasets import Dataset

    encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
    return Dataset.from_dict(
        {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": split.labels,
        }
    )


def _validation_auc(prediction) -> dict[str, float]:
    """``compute_metrics`` of the Trainer: the validation AUC of P(toxic)."""
    from sklearn.metrics import roc_auc_score

    logits = np.asarray(prediction.predictions, dtype=np.float64)
    logits = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    labels = np.asarray(prediction.label_ids)
    if len(set(labels.tolist())) < 2:
        return {"auc": float("nan")}
    return {"auc": float(roc_auc_score(labels, probs[:, 1]))}


def _best_validation_callback():
    """A callback that keeps a copy of the trainable weights at the evaluation with the best validation AUC."""
    from transformers import TrainerCallback

    class BestValidation(TrainerCallback):
        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []
            self.best: dict[str, Any] | None = None
            self.weights: dict[str, Any] = {}

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            auc = (metrics or {}).get("eval_auc")
            if auc is None or model is None:
                return
            entry = {"step": int(state.global_step), "epoch": float(state.epoch or 0.0), "auc": float(auc)}
            self.history.append(entry)
            logger.info("validation AUC %.4f at step %d (epoch %.2f)", auc, entry["step"], entry["epoch"])
            if math.isfinite(auc) and (self.best is None or auc > self.best["auc"]):
                self.best = entry
                self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def restore(self, model) -> None:
            if not self.weights:
                return
            params = dict(model.named_parameters())
            import torch

            with torch.no_grad():
                for name, value in self.weights.items():
                    params[name].copy_(value)

    return BestValidation()


def _toxicity(constraint, texts: list[str], *, desc: str, batch_size: int) -> np.ndarray:
    """``1 - P(satisfied)`` of ``constraint`` for ``texts``, with a progress bar."""
    from steer.progress import chunks

    out = [
        1.0 - np.asarray(constraint.score(list(chunk)), dtype=np.float64)
        for chunk in chunks(texts, batch_size, desc=desc, unit="text")
    ]
    return np.concatenate(out) if out else np.zeros(0)


def _measure(
    directory: Path, split: dict[str, OracleSplit], script_args: OracleScriptArguments, batch_size: int
) -> dict[str, Any]:
    """Load the saved classifier through :class:`ClassifierConstraint` (as its users do) and measure it on the
    validation and held-out texts; alt-profanity-check on the same held-out texts."""
    from steer.constraints import ClassifierConstraint, NonToxic

    oracle = ClassifierConstraint(
        str(directory), positive_label="non_toxic", batch_size=batch_size, max_length=script_args.max_length
    )
    metrics: dict[str, Any] = {}
    validation = split["validation"]
    if validation.texts:
        tox = _toxicity(oracle, validation.texts, desc="validation texts", batch_size=batch_size)
        metrics["validation"] = {
            **auc_with_interval(validation.labels, tox, validation.record, n_boot=0),
            "texts": len(validation.texts),
            "toxic": validation.positives,
        }
        metrics["validation"].pop("auc_ci95")
    heldout = split["heldout"]
    if heldout.texts:
        tox = _toxicity(oracle, heldout.texts, desc="held-out texts", batch_size=batch_size)
        other = None
        if script_args.compare_profanity:
            other = _toxicity(
                NonToxic("profanity"), heldout.texts, desc="alt-profanity-check", batch_size=4096
            )
        result = auc_with_interval(
            heldout.labels, tox, heldout.record, n_boot=script_args.bootstrap_samples, other_scores=other
        )
        metrics["heldout"] = {
            "auc": result["auc"],
            "auc_ci95": result["auc_ci95"],
            **accuracy_f1(heldout.labels, tox),
            "texts": len(heldout.texts),
            "toxic": heldout.positives,
            "records": heldout.num_records,
            "interval": f"95% percentile bootstrap over records ({script_args.bootstrap_samples} resamples)",
        }
        if other is not None:
            metrics["heldout_profanity"] = {
                "oracle": "alt-profanity-check (NonToxic(backend='profanity'))",
                "auc": result["other_auc"],
                "auc_ci95": result["other_auc_ci95"],
                **accuracy_f1(heldout.labels, other),
            }
            metrics["heldout_difference"] = {
                "auc": result["auc_difference"],
                "auc_ci95": result["auc_difference_ci95"],
                "what": "classifier AUC - alt-profanity-check AUC on the same texts (paired resamples)",
            }
    return metrics


def _fmt_ci(values) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]" if values and all(map(math.isfinite, values)) else "[n/a]"


def _report_lines(record: dict[str, Any], directory: Path) -> list[str]:
    metrics = record.get("metrics") or {}
    lines = []
    heldout = metrics.get("heldout")
    if heldout:
        lines.append(
            f"held-out AUC vs Perspective: {heldout['auc']:.4f} {_fmt_ci(heldout['auc_ci95'])} "
            f"({heldout['texts']} texts of {heldout['records']} records, {heldout['toxic']} toxic)"
        )
    profanity = metrics.get("heldout_profanity")
    if profanity:
        diff = metrics["heldout_difference"]
        lines.append(
            f"alt-profanity-check on the same texts: {profanity['auc']:.4f} {_fmt_ci(profanity['auc_ci95'])}; "
            f"difference {diff['auc']:+.4f} {_fmt_ci(diff['auc_ci95'])}"
        )
    lines.append(
        f"use it: steer eval toxicity --oracle classifier --oracle_checkpoint {directory} --oracle_label toxic; "
        f"in a recipe: constraint: classifier, constraint_kwargs: {{model_name_or_path: {directory}, "
        "positive_label: non_toxic}"
    )
    return lines


def train_oracle(
    script_args: OracleScriptArguments, training_args: TrainingArguments, *, callbacks=None
) -> dict:
    """Train the toxicity oracle and save it to ``training_args.output_dir``; returns its ``oracle.json``.

    Checks first (output directory, data, split), then reuses a finished oracle with the same settings, else
    loads the model, trains its LoRA adapter and score head, keeps the training point with the best validation
    AUC, merges the adapter, and writes the classifier directory atomically (a temporary sibling renamed into
    place) after measuring it, loaded back through :class:`~steer.constraints.ClassifierConstraint`.
    """
    from transformers import DataCollatorWithPadding, Trainer

    from steer.io import atomic_dir, atomic_write_json

    start = time.perf_counter()
    if getattr(training_args, "resume_from_checkpoint", None):
        raise UserInputError(
            "OracleTrainingArguments.resume_from_checkpoint is not supported: the oracle keeps no checkpoints; "
            "rerun the command"
        )
    split = oracle_split(script_args)
    settings = oracle_settings(script_args, training_args, split)
    directory = Path(training_args.output_dir).expanduser()
    cached = check_oracle_output_dir(str(directory), settings, overwrite=script_args.overwrite_output_dir)
    if cached is not None:
        logger.info(
            "%s already holds a finished oracle with these settings and data; not training again", directory
        )
        for line in _report_lines(cached, directory):
            logger.info(line)
        return cached
    for name, part in split.items():
        logger.info(
            "%s: %d records, %d texts (%d toxic), %d texts without a %s score skipped",
            name,
            part.num_records,
            len(part.texts),
            part.positives,
            part.num_unlabelled,
            script_args.attribute,
        )

    model, tokenizer = load_classifier(script_args)
    from peft import get_peft_model

    from steer.models import quiet_adapter_load

    with quiet_adapter_load():
        model = get_peft_model(model, script_args.peft_config())
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    evaluate = bool(split["validation"].texts) and str(strategy) != "no"
    best = _best_validation_callback()
    work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.train-", dir=directory.parent))
    try:
        args = dataclasses.replace(
            training_args,
            output_dir=str(work),
            eval_strategy=training_args.eval_strategy if evaluate else "no",
            label_names=["labels"],
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_tokenized(split["train"], tokenizer, script_args.max_length),
            eval_dataset=_tokenized(split["validation"], tokenizer, script_args.max_length)
            if evaluate
            else None,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=_validation_auc if evaluate else None,
            callbacks=[best, *(callbacks or [])],
        )
        output = trainer.train()
        if evaluate and (not best.history or best.history[-1]["step"] != trainer.state.global_step):
            trainer.evaluate()  # the last step is a candidate too
        selected = {"step": int(trainer.state.global_step), "rule": "last step (no validation)"}
        if evaluate and best.best is not None:
            best.restore(model)
            selected = {**best.best, "rule": "best validation AUC"}
            logger.info("keeping step %d (validation AUC %.4f)", best.best["step"], best.best["auc"])
        train_seconds = time.perf_counter() - start
        merged = model.merge_and_unload()
        merged.config.id2label = dict(enumerate(LABELS))
        merged.config.label2id = {label: i for i, label in enumerate(LABELS)}
        merged.config.pad_token_id = tokenizer.pad_token_id
        merged.eval()

        def write(tmp: Path) -> None:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            metrics = _measure(tmp, split, script_args, training_args.per_device_eval_batch_size)
            record = {
                "schema": ORACLE_SCHEMA,
                "labels": list(LABELS),
                "label_rule": f"{script_args.attribute} >= {script_args.label_threshold} (Perspective)",
                "settings": settings,
                "split": {
                    **{name: part.summary() for name, part in split.items()},
                    "rule": f"held out: the last {script_args.heldout_size} records; validation: "
                    f"{script_args.validation_size} records drawn with split_seed {script_args.split_seed} from the "
                    "others; train: the rest",
                },
                "selected": selected,
                "validation_history": best.history,
                "train_loss": float(output.training_loss),
                "steps": int(trainer.state.global_step),
                "metrics": metrics,
                "seconds": {"train": round(train_seconds, 1), "total": round(time.perf_counter() - start, 1)},
            }
            atomic_write_json(tmp / ORACLE_FILE, record)

        atomic_dir(directory, write)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = json.loads((directory / ORACLE_FILE).read_text())
    logger.info("toxicity oracle saved to %s", directory)
    for line in _report_lines(record, directory):
        logger.info(line)
    return record
