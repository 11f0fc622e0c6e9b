"""Agreement of a toxicity oracle with the Perspective labels shipped in RealToxicityPrompts (``steer eval
agreement``): AUC, accuracy and F1 of the oracle's toxicity against ``<field>.<attribute> > threshold``; and the
AUC with a bootstrap interval over records (:func:`auc_with_interval`, also paired against a second oracle)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..constraints import Constraint
from ..errors import UserInputError
from .oracle import OracleArguments, build_oracle
from .report import write_json
from .stats import bootstrap_ci

AGREEMENT_SCHEMA = "steer.eval.oracle_agreement/v1"


@dataclass
class OracleAgreementArguments(OracleArguments):
    """Arguments of the oracle-agreement report (oracle vs Perspective labels shipped with RTP)."""

    rtp_field: str = field(
        default="continuation",
        metadata={
            "help": "Which RTP text to score: 'continuation' or 'prompt'.",
            "choices": ["continuation", "prompt"],
        },
    )
    attribute: str = field(default="toxicity", metadata={"help": "Perspective attribute used as the label."})
    label_threshold: float = field(
        default=0.5, metadata={"help": "A text is toxic when its Perspective score is > this."}
    )
    oracle_threshold: float = field(
        default=0.5,
        metadata={"help": "The oracle predicts toxic when its toxicity is >= this (accuracy/F1)."},
    )
    limit: int | None = field(default=None, metadata={"help": "Use only the first N RTP records."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the result as JSON here."})
    device: str | None = field(default=None, metadata={"help": "Device for neural oracles."})

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "OracleAgreementArguments"
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"{name}.limit must be >= 1 (or unset), got {self.limit}")
        for key in ("label_threshold", "oracle_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{name}.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.oracle_batch_size is not None and self.oracle_batch_size < 1:
            raise ValueError(f"{name}.oracle_batch_size must be >= 1, got {self.oracle_batch_size}")


def oracle_agreement(
    oracle: Constraint,
    dataset=None,
    *,
    field: str = "continuation",
    attribute: str = "toxicity",
    label_threshold: float = 0.5,
    oracle_threshold: float = 0.5,
    limit: int | None = None,
) -> dict:
    """AUC / accuracy / F1 of an oracle's toxicity against Perspective labels (score > threshold).

    ``dataset``: RTP records (a ``datasets.Dataset`` or a list of dicts); default :func:`steer.data.load_rtp`.
    Records without a Perspective score are skipped (``num_unlabelled``).
    """
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    if dataset is None:
        from ..data import load_rtp

        dataset = load_rtp(limit)
    records = dataset[field] if hasattr(dataset, "column_names") else [r[field] for r in dataset]
    if limit is not None:
        records = records[:limit]
    texts, labels, unlabelled = [], [], 0
    for record in records:
        value = record.get(attribute) if isinstance(record, dict) else None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            unlabelled += 1
            continue
        texts.append(record["text"])
        labels.append(bool(value > label_threshold))
    if not texts:
        raise UserInputError(
            f"no RTP records with a {field}.{attribute} score (attribute: a Perspective score)"
        )
    start = time.perf_counter()
    scores = oracle.evaluate(texts)
    seconds = time.perf_counter() - start
    valid = scores.valid.numpy()
    tox = 1.0 - scores.probs.double().numpy()[valid]
    y = np.asarray(labels)[valid]
    pred = tox >= oracle_threshold
    both = 0 < y.sum() < len(y)
    return {
        "schema": AGREEMENT_SCHEMA,
        "oracle": oracle.name,
        "label": f"{field}.{attribute} > {label_threshold}",
        "auc": float(roc_auc_score(y, tox)) if both else float("nan"),
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0.0)),
        "positive_rate": float(y.mean()),
        "predicted_positive_rate": float(pred.mean()),
        "oracle_threshold": oracle_threshold,
        "num_texts": int(len(y)),
        "num_unlabelled": unlabelled,
        "num_invalid_scores": int((~valid).sum()),
        "texts_per_second": len(texts) / seconds if seconds > 0 else float("inf"),
    }


def run_oracle_agreement(
    args: OracleAgreementArguments, *, oracle: Constraint | None = None, dataset=None
) -> dict:
    """CLI entry point of the agreement report; writes ``args.output_file`` when set (checked first)."""
    if args.output_file:
        from ..io import check_writable_dir

        check_writable_dir(
            Path(args.output_file).expanduser().parent, what="OracleAgreementArguments.output_file: directory"
        )
    oracle = oracle or build_oracle(args, device=args.device)
    result = oracle_agreement(
        oracle,
        dataset,
        field=args.rtp_field,
        attribute=args.attribute,
        label_threshold=args.label_threshold,
        oracle_threshold=args.oracle_threshold,
        limit=args.limit,
    )
    result["config"] = asdict(args)
    if args.output_file:
        write_json(args.output_file, result)
    return result


def auc_with_interval(
    labels, scores, records, *, n_boot: int = 2000, seed: int = 0, other_scores=None
) -> dict[str, Any]:
    """ROC AUC of ``scores`` against ``labels`` with a 95% percentile bootstrap interval over records (the
    texts of one record are resampled together). With ``other_scores``: the same for them, and the paired
    difference ``auc - other_auc`` with its interval (the same resamples)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    _, unit = np.unique(np.asarray(records), return_inverse=True)
    n_units = int(unit.max()) + 1 if unit.size else 0

    def auc_of(values: np.ndarray, picked: np.ndarray | None = None) -> float:
        if picked is None:
            return float(roc_auc_score(labels, values))
        weight = np.bincount(picked.astype(np.int64), minlength=n_units)[unit]
        mask = weight > 0
        if len(set(labels[mask].tolist())) < 2:
            return float("nan")
        return float(roc_auc_score(labels[mask], values[mask], sample_weight=weight[mask]))

    def interval(statistic) -> list[float]:
        if n_boot < 1 or n_units < 2:
            return [float("nan"), float("nan")]
        return list(bootstrap_ci(np.arange(n_units), statistic, n_boot=n_boot, seed=seed))

    out: dict[str, Any] = {"auc": auc_of(scores), "auc_ci95": interval(lambda idx: auc_of(scores, idx))}
    if other_scores is not None:
        other = np.asarray(other_scores, dtype=np.float64)
        out["other_auc"] = auc_of(other)
        out["other_auc_ci95"] = interval(lambda idx: auc_of(other, idx))
        out["auc_difference"] = out["auc"] - out["other_auc"]
        out["auc_difference_ci95"] = interval(lambda idx: auc_of(scores, idx) - auc_of(other, idx))
    return out


def accuracy_f1(labels, toxicity, threshold: float = 0.5) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    predicted = np.asarray(toxicity) >= threshold
    return {
        "accuracy_at_0.5": float(accuracy_score(labels, predicted)),
        "f1_at_0.5": float(f1_score(labels, predicted, zero_division=0.0)),
    }
