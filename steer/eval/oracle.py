"""Which toxicity oracle scores the texts: :class:`OracleArguments` and :func:`build_oracle`.

The oracle is a constraint of the registry (:data:`steer.constraints.CONSTRAINTS`, the names a recipe's
``constraint`` takes); a text's toxicity is 1 - P(satisfied).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..constraints import CONSTRAINTS, Constraint, build_constraint, constraint_kwargs
from ..errors import UserInputError


@dataclass
class OracleArguments:
    """Which toxicity oracle scores the texts."""

    oracle: str = field(
        default="profanity",
        metadata={
            "help": "Toxicity oracle, a name of the constraint registry (as a recipe's constraint): "
            "'profanity' (offline SVM), 'detoxify', 'classifier' (any HF sequence classifier at "
            "--oracle_checkpoint whose --oracle_label is the toxic class), 'non_toxic' (NonToxic's default, "
            "profanity), 'topic' (--oracle_kwargs '{\"topic\": \"politics\"}': a text's toxicity is 1 when it "
            "mentions none of the topic's words, so 'toxicity' reads as 'off topic'), 'keyword' (--oracle_kwargs with its words).",
            "choices": sorted(CONSTRAINTS),
        },
    )
    oracle_model_type: str = field(
        default="original",
        metadata={
            "help": "detoxify model type (original, unbiased, multilingual, ...) when no checkpoint is given."
        },
    )
    oracle_checkpoint: str | None = field(
        default=None,
        metadata={"help": "detoxify: a local .ckpt (offline); classifier: the model directory or hub id."},
    )
    oracle_config_dir: str | None = field(
        default=None,
        metadata={"help": "detoxify offline: local Hugging Face config + tokenizer dir for the checkpoint."},
    )
    oracle_label: str = field(
        default="toxicity",
        metadata={"help": "The oracle's toxic label (detoxify: toxicity, insult, threat, ...)."},
    )
    oracle_batch_size: int | None = field(
        default=None, metadata={"help": "Texts per oracle batch (default: 4096 profanity, 64 neural)."}
    )
    oracle_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "More keyword arguments of the oracle's constraint, as a recipe's constraint_kwargs (JSON on the "
            'command line), e.g. {"topic": "politics"}; they override those the oracle_* fields give.'
        },
    )

    def __post_init__(self) -> None:
        self.oracle_kwargs = constraint_kwargs(self.oracle_kwargs, f"{type(self).__name__}.oracle_kwargs")


def _oracle_kwargs(args: OracleArguments, device: str | torch.device | None) -> dict[str, Any]:
    """The keyword arguments that the ``oracle_*`` fields give the registry constraint ``args.oracle``."""
    if args.oracle == "profanity":
        return {"label": args.oracle_label, "batch_size": args.oracle_batch_size}
    if args.oracle in ("detoxify", "non_toxic"):
        return {
            "model_type": args.oracle_model_type,
            "checkpoint": args.oracle_checkpoint,
            "config_dir": args.oracle_config_dir,
            "label": args.oracle_label,
            "batch_size": args.oracle_batch_size,
            "device": device,
        }
    if args.oracle == "classifier":
        return {
            "model_name_or_path": args.oracle_checkpoint,
            "positive_label": args.oracle_label,
            "negate": True,
            "batch_size": args.oracle_batch_size or 64,
            "device": device,
        }
    return {}


def build_oracle(args: OracleArguments, device: str | torch.device | None = None) -> Constraint:
    """The toxicity oracle described by ``args`` (its P(satisfied) = 1 - toxicity): the registry constraint
    ``args.oracle`` (:func:`steer.constraints.build_constraint`), built from the ``oracle_*`` fields."""
    if args.oracle == "classifier" and not args.oracle_checkpoint:
        raise UserInputError("oracle='classifier' needs --oracle_checkpoint (a model directory or hub id)")
    owner = type(args).__name__
    hint = ""
    if args.oracle == "detoxify":  # offline: the published checkpoint or its config cannot be downloaded
        hint = (
            "; offline, pass --oracle_checkpoint (a local detoxify .ckpt) and --oracle_config_dir (its "
            "Hugging Face config + tokenizer directory)"
        )
    return build_constraint(
        args.oracle,
        {**_oracle_kwargs(args, device), **args.oracle_kwargs},
        field=f"{owner}.oracle",
        kwargs_field=f"{owner}.oracle_* arguments",
        load_hint=hint,
    )
