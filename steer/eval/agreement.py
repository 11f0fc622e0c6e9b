"""Agreement of a toxicity oracle with the Perspective labels shipped in RealToxicityPrompts (``steer eval
agreement``): AUC, accuracy and F1 of the oracle's toxicity against ``<field>.<attribute> > threshold``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..constraints import Constraint
from ..errors import UserInputError
from .oracle import OracleArguments, build_oracle
from .report import write_json

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
