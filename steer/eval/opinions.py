"""OpinionQA evaluation of persona steering (``steer eval opinions``): an honest protocol by default.

Nothing scored here reached training: the group protocol scores every ordinal question of the
*evaluation waves* recorded in ``split.json`` (the embedder and the soft-prompt network saw only the
training waves; checkpoints were picked on the validation waves), the individual protocol scores
*held-out questions* only. Every number comes with a 95% bootstrap interval over questions and its count.

* **representativeness** (Santurkar et al. 2023) toward each group of ``group_attribute`` (and every
  folded-in group): ``1 - WD(p_model, p_group) / (max - min ordinal)`` per question against the REAL Pew
  group distribution; the mean over questions with a percentile bootstrap interval.
* **group specificity**: rep(steered_g, real_g) - mean_h rep(steered_h, real_g) over the other groups h of
  the same attribute (own persona minus wrong personas on g's real answers), with a paired bootstrap
  interval: exactly 0 for a persona-blind model; the real data's own value, 1 - mean_h rep(real_h, real_g),
  is reported as ``real`` (what a model that reproduced every group exactly would get).
* **per-individual accuracy** (individual protocol, Li et al. 2024): the share of a person's held-out
  answers whose option gets the highest probability, macro-averaged over people.

Methods. Language-model methods: ``steered`` (the group's / person's persona), ``raw`` (the bare
question), ``demographic`` (the group described in words), ``few_shot`` (the group's modal answers /
the person's own answers to ``few_shot_k`` training questions in the prompt), ``cohort`` (individuals: the
person's cohort centroid). Persona ablations: ``zero`` (the zero vector, i.e. the average training
persona after standardisation), ``shuffled`` (the persona of another, randomly drawn training group /
person) and ``wrong_group`` (groups: the outputs steered by the other groups' personas, scored against
this group). Baselines without a language model: ``population`` (the whole population's real
distribution of the evaluated question used for every group: an oracle reference that reads the
evaluated question's answers), ``majority`` (all mass on the population's most common answer),
``uniform``, ``train_frequency`` (persona-blind: the population distribution of the same question in a
training wave, where a question repeats across waves), ``group_train_frequency`` (the same with the
group's own distribution), and, for individuals, ``population_mode``. The MF prediction is defined only
for questions the embedder trained on, so it is not defined under these protocols (reported as such).

This module holds the command's settings, the loading of its artefacts and :func:`run_opinion_eval`; the group
protocol and the cohorts are in :mod:`steer.eval.opinion_groups`, the individual protocol in
:mod:`steer.eval.opinion_individuals`, the metrics in :mod:`steer.eval.opinion_metrics`, the baselines and
ablations in :mod:`steer.eval.opinion_baselines` and the report in :mod:`steer.eval.opinion_report`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from steer.errors import ArtefactMismatchError, InputFileNotFoundError, UserInputError
from steer.eval.opinion_groups import evaluate_groups
from steer.eval.opinion_individuals import INDIVIDUAL_METHODS, evaluate_individuals
from steer.eval.opinion_report import write_opinion_report

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "OpinionEvalArguments", "check_same_run", "run_opinion_eval"]

RESULT_SCHEMA = "steer.eval.opinions/v2"
SPLITS = ("eval", "within", "valid", "train")
LM_METHODS = ("steered", "zero", "shuffled", "raw", "demographic", "few_shot", "cohort")
DERIVED_METHODS = ("wrong_group",)
REFERENCE_METHODS = (
    "text_ridge",
    "text_knn",
    "population",
    "majority",
    "uniform",
    "train_frequency",
    "group_train_frequency",
    "population_mode",
)
METHODS = LM_METHODS + DERIVED_METHODS + REFERENCE_METHODS


@dataclass
class OpinionEvalArguments:
    """Settings of ``steer eval opinions``."""

    persona_dir: str = field(default="", metadata={"help": "Trained persona directory (output_dir/persona)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base LM (default: the base_model recorded in the persona directory)."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Split written by training (train.csv, heldout.csv, split.json); "
            "default: <persona_dir>/../data."
        },
    )
    output_dir: str = field(default="opinion-eval", metadata={"help": "Where the report is written."})
    run_name: str = field(default="persona", metadata={"help": "Name of this run in the report."})
    methods: list[str] = field(
        default_factory=lambda: list(METHODS),
        metadata={
            "help": f"Methods to evaluate, from {list(METHODS)} (each protocol runs those it defines)."
        },
    )
    max_users: int = field(default=40, metadata={"help": "People evaluated for per-individual accuracy."})
    max_answers_per_user: int = field(default=8, metadata={"help": "Held-out answers per person (at most)."})
    few_shot_k: int = field(
        default=3, metadata={"help": "Own training answers shown by the few_shot baseline."}
    )
    group_attribute: str = field(
        default="POLPARTY", metadata={"help": "Attribute whose groups are scored for representativeness."}
    )
    max_questions: int | None = field(
        default=None,
        metadata={
            "help": "Cap on scored questions (default: every ordinal question of the evaluation split)."
        },
    )
    n_bootstrap: int = field(
        default=2000, metadata={"help": "Bootstrap resamples for the 95 percent intervals."}
    )
    split: str = field(
        default="eval",
        metadata={
            "help": "'eval': score the evaluation questions (the reported numbers); 'within': the within-wave held-out "
            "questions of the training waves (training's within_wave_holdout; reported as the second protocol); "
            "'valid': score the validation questions instead (for choices such as settings or checkpoints, never "
            "for reporting); 'train': the "
            "training questions (a diagnostic of fit, e.g. persona specificity where the network learned it; never "
            "evidence of steering)."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype (float32 default)."})
    device: str | None = field(
        default=None, metadata={"help": "Device (default: cuda if available, else cpu)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the user / question / few-shot choices."})
    cohorts: bool = field(
        default=True,
        metadata={
            "help": "groups: also score the cohorts of the training groups (k-means over their persona vectors, "
            "the paper's cluster personas) against their members' mean real distribution (needs steered)."
        },
    )

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"OpinionEvalArguments.methods: unknown {unknown}; choose from {list(METHODS)}")
        if self.split not in SPLITS:
            raise ValueError(
                f"OpinionEvalArguments.split must be 'eval', 'within', 'valid' or 'train', got {self.split!r}"
            )
        if not self.methods:
            raise ValueError(f"OpinionEvalArguments.methods must not be empty; choose from {list(METHODS)}")
        for name in ("max_users", "max_answers_per_user", "n_bootstrap", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"OpinionEvalArguments.{name} must be >= 1, got {getattr(self, name)}")
        if self.few_shot_k < 0:
            raise ValueError(f"OpinionEvalArguments.few_shot_k must be >= 0, got {self.few_shot_k}")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError(f"OpinionEvalArguments.max_questions must be >= 1, got {self.max_questions}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"OpinionEvalArguments.dtype must be float32, bfloat16 or float16, got {self.dtype!r}"
            )


def _persona_dir(args: OpinionEvalArguments) -> Path:
    """``args.persona_dir``, refused unless it holds a soft-prompt network written by training."""
    persona_dir = Path(args.persona_dir)
    if not args.persona_dir:
        raise InputFileNotFoundError(
            "OpinionEvalArguments.persona_dir is not set (the persona directory of a `steer train persona` run: "
            "<output_dir>/persona)"
        )
    if not persona_dir.is_dir():
        raise InputFileNotFoundError(
            f"OpinionEvalArguments.persona_dir not found: {args.persona_dir!r} (train with `steer train persona`)"
        )
    for name in ("soft_prompt_config.json", "soft_prompt.safetensors"):
        if not (persona_dir / name).is_file():
            raise InputFileNotFoundError(
                f"OpinionEvalArguments.persona_dir: {persona_dir} has no {name} (not a persona directory written "
                "by `steer train persona`, or an incomplete one)"
            )
    return persona_dir


def _read_split(data_dir: Path) -> tuple[dict, Path]:
    split_path = data_dir / "split.json"
    if not split_path.is_file():
        raise InputFileNotFoundError(
            f"evaluation data not found: {split_path} (written by `steer train persona`; set data_dir)"
        )
    split = _read_json(split_path)
    for key in ("waves", "question_keys"):
        if key not in split:
            raise UserInputError(f"{split_path}: missing field {key!r}")
    return split, split_path


def _check_group_attribute(index: dict, persona_dir: Path, attribute: str) -> None:
    names = index.get("names") or []
    if names and not any(n.startswith(f"{attribute}=") for n in names):
        known = sorted({n.split("=", 1)[0] for n in names if "=" in n and not n.startswith("cohort:")})
        raise UserInputError(
            f"OpinionEvalArguments.group_attribute: {persona_dir} stores no {attribute!r} personas "
            f"(attributes it has: {known})"
        )


def _load(args: OpinionEvalArguments):
    """The persona-steered model, the split, the persona index and (individual protocol) the training and
    held-out answers; every file is checked before the model loads."""
    from steer.persona.opinionqa import load_responses, load_waves
    from steer.persona.steering import PERSONAS_INDEX, PersonaSteeredModel

    persona_dir = _persona_dir(args)
    data_dir = Path(args.data_dir) if args.data_dir else persona_dir.parent / "data"
    split, split_path = _read_split(data_dir)
    protocol = split.get("protocol", "individuals")
    index = _read_json(persona_dir / PERSONAS_INDEX) if (persona_dir / PERSONAS_INDEX).is_file() else {}
    check_same_run(split, index, split_path, persona_dir)
    if protocol == "groups":
        _check_group_attribute(index, persona_dir, args.group_attribute)
    base = args.model_name_or_path or index.get("base_model")
    if not base:
        raise UserInputError(
            "OpinionEvalArguments.model_name_or_path is not set and the persona directory records no base_model"
        )
    if protocol == "individuals":
        for path in (data_dir / "train.csv", data_dir / "heldout.csv"):
            if not path.is_file():
                raise InputFileNotFoundError(
                    f"evaluation data not found: {path} (written by `steer train persona`)"
                )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    steered = PersonaSteeredModel.from_pretrained(base, persona_dir, dtype=args.dtype, device=device)
    train = heldout = None
    if protocol == "individuals":
        questions = load_waves(split.get("opinionqa_dir"), split["waves"])
        questions = {k: questions[k] for k in split["question_keys"] if k in questions}
        train = load_responses(data_dir / "train.csv", questions)
        heldout = load_responses(data_dir / "heldout.csv", questions)
    return steered, split, index, train, heldout


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_same_run(split: dict, index: dict, split_path: Path, persona_dir: Path) -> None:
    """Refuse a split (``data/split.json``) and a persona directory written by different training runs.

    ``steer train persona`` records one ``run_id`` in both; artefacts from before run ids were recorded
    (neither has one) pass with a warning.
    """
    data_run, persona_run = split.get("run_id"), index.get("run_id")
    if data_run is None and persona_run is None:
        logger.warning(
            "%s and %s record no run id (written by an older steer): cannot check they belong together",
            split_path,
            persona_dir,
        )
        return
    if data_run != persona_run:
        raise ArtefactMismatchError(
            f"{split_path} (run {data_run or 'unrecorded'}) and {persona_dir} (run {persona_run or 'unrecorded'}) "
            "come from different training runs; evaluate a persona directory with the data/ its own run wrote "
            "(rerun `steer train persona`, or point data_dir at the matching split)"
        )


def _individuals(steered, split: dict, index: dict, train, heldout, args: OpinionEvalArguments) -> dict:
    """The individual protocol, with the population's answers for ``population_mode`` where they load."""
    from steer.persona.groups import load_group_table

    try:
        table = load_group_table(split.get("opinionqa_dir"), split["waves"], attributes=["POLPARTY"])
        population = table.population
    except (FileNotFoundError, ValueError) as err:
        logger.warning("population_mode baseline skipped: %s", err)
        population = None
    return evaluate_individuals(
        steered,
        train,
        heldout,
        [m for m in args.methods if m in INDIVIDUAL_METHODS],
        args,
        cohort_of=index.get("cohort_of_user"),
        population=population,
    )


def _headline_metrics(groups: dict, individuals: dict | None) -> dict[str, float]:
    """``representativeness/<method>``, ``specificity/<group>`` and ``accuracy_macro/<method>``."""
    metrics = {}
    for method, values in groups["methods"].items():
        if values["mean"]["n"]:  # methods not defined on any scored question are left out
            metrics[f"representativeness/{method}"] = values["mean"]["mean"]
    for g, value in groups["specificity"].items():
        metrics[f"specificity/{g}"] = value["mean"]
    if individuals:
        for method, values in individuals["methods"].items():
            metrics[f"accuracy_macro/{method}"] = values["accuracy_macro"]
    return metrics


def run_opinion_eval(args: OpinionEvalArguments) -> dict:
    """Evaluate a trained persona directory; writes the report into ``args.output_dir`` and returns it."""
    start = time.perf_counter()
    steered, split, index, train, heldout = _load(args)
    groups = evaluate_groups(steered, split, args.methods, args)
    individuals = None
    if train is not None:
        individuals = _individuals(steered, split, index, train, heldout, args)
    result = {
        "schema": RESULT_SCHEMA,
        "run_name": args.run_name,
        "protocol": split.get("protocol", "individuals"),
        "metrics": _headline_metrics(groups, individuals),
        "groups": groups,
        "individuals": individuals,
        "config": asdict(args),
        "data": {
            k: split.get(k)
            for k in ("waves", "train_waves", "valid_waves", "eval_waves", "source", "num_users")
        },
        "seconds": time.perf_counter() - start,
    }
    paths = write_opinion_report(result, args.output_dir)
    logger.info("opinion report written: %s", {k: str(v) for k, v in paths.items()})
    return result
