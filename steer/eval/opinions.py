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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from steer.errors import ArtefactMismatchError, InputFileNotFoundError, UserInputError
from steer.persona.text_baseline import TEXT_BASELINES, fit_text_baselines

logger = logging.getLogger(__name__)

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
GROUP_METHODS = (
    "steered",
    "zero",
    "shuffled",
    "wrong_group",
    "raw",
    "demographic",
    "few_shot",
    "text_ridge",
    "text_knn",
    "population",
    "majority",
    "uniform",
    "train_frequency",
    "group_train_frequency",
)
INDIVIDUAL_METHODS = (
    "steered",
    "zero",
    "shuffled",
    "raw",
    "demographic",
    "few_shot",
    "cohort",
    "population_mode",
)
CONTRASTS = (
    "raw",
    "demographic",
    "few_shot",
    "zero",
    "shuffled",
    "wrong_group",
    "text_ridge",
    "text_knn",
    "population",
)
# the real difference of two groups' expected answers a question needs for its direction to count
DIRECTION_MIN_GAP = 0.05
ATTRIBUTE_WORDS = {
    "CREGION": "region of the US",
    "AGE": "age",
    "SEX": "sex",
    "EDUCATION": "education",
    "CITIZEN": "US citizen",
    "MARITAL": "marital status",
    "RELIG": "religion",
    "RELIGATTEND": "religious attendance",
    "POLPARTY": "political party",
    "INCOME": "income",
    "POLIDEOLOGY": "political ideology",
    "RACE": "race",
}


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


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def ordinal_wasserstein(p: Sequence[float], q: Sequence[float], support: Sequence[float]) -> float:
    """Wasserstein-1 distance between two distributions over the same sorted ordinal ``support``."""
    p, q, s = (np.asarray(x, dtype=np.float64) for x in (p, q, support))
    if not (p.shape == q.shape == s.shape) or p.ndim != 1:
        raise ValueError(f"shapes differ: p {p.shape}, q {q.shape}, support {s.shape}")
    if np.any(np.diff(s) < 0):
        raise ValueError(f"support must be sorted ascending, got {s.tolist()}")
    for name, x in (("p", p), ("q", q)):
        if np.any(x < 0) or not np.isclose(x.sum(), 1.0, atol=1e-4):
            raise ValueError(f"{name} is not a probability distribution: {x.tolist()}")
    cdf_gap = np.abs(np.cumsum(p) - np.cumsum(q))[:-1]
    return float((cdf_gap * np.diff(s)).sum())


def representativeness(p_model: Sequence[float], p_human: Sequence[float], support: Sequence[float]) -> float:
    """``1 - WD(p_model, p_human) / (max - min)`` of the ordinal ``support`` (1 = identical)."""
    s = np.asarray(support, dtype=np.float64)
    span = float(s.max() - s.min())
    if span <= 0:
        raise ValueError(
            "representativeness needs an ordinal support with max > min (not a nominal question)"
        )
    return 1.0 - ordinal_wasserstein(p_model, p_human, s) / span


def macro_accuracy(correct: dict[str, list[bool]]) -> float:
    """Mean over people of each person's share of correct answers (people without answers skipped)."""
    scores = [float(np.mean(v)) for v in correct.values() if len(v)]
    return float(np.mean(scores)) if scores else math.nan


# --------------------------------------------------------------------------------------------------
# Prompts for the baselines
# --------------------------------------------------------------------------------------------------


def demographic_preamble(traits: dict[str, str]) -> str:
    """The person / group described in words (the demographic-prompting baseline)."""
    parts = [f"{ATTRIBUTE_WORDS.get(k, k.lower())}: {v}" for k, v in traits.items()]
    return "Answer the following question as a person with these characteristics: " + "; ".join(parts) + "."


def few_shot_preamble(examples: Sequence[tuple[str, str]]) -> str:
    """K of the person's own answers (the context few-shot baseline)."""
    lines = ["Here are some of your answers to other survey questions:"]
    for question, answer in examples:
        lines.append(f"Q: {question.strip()}\nA: {answer}")
    lines.append("Answer the next question the way you would.")
    return "\n".join(lines)


def _traits(row, columns: Sequence[str]) -> dict[str, str]:
    out = {}
    for column in columns:
        value = row.get(column)
        if (
            value is None
            or (isinstance(value, float) and math.isnan(value))
            or str(value) in ("nan", "Refused")
        ):
            continue
        out[column] = str(value)
    return out


def group_few_shot_preamble(examples: Sequence[tuple[str, str]]) -> str:
    """K of a group's most common answers (the context few-shot baseline for groups)."""
    lines = ["Here are the most common answers of people in your group to other survey questions:"]
    for question, answer in examples:
        lines.append(f"Q: {question.strip()}\nA: {answer}")
    lines.append("Answer the next question the way people in your group would.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


def _stem(key: str) -> str:
    return re.sub(r"_W\d+$", "", key)


def eval_question_keys(split: dict, part: str = "eval") -> list[str]:
    """The scored questions of a split (``eval_question_keys``; older splits: every question, logged)."""
    if part == "within":
        keys = split.get("within_question_keys")
        if not keys:
            raise UserInputError(
                "OpinionEvalArguments.split=within: split.json holds no within-wave held-out questions (train with "
                "within_wave_holdout > 0)"
            )
        return list(keys)
    if part in ("valid", "train"):
        keys = split.get(f"{part}_question_keys")
        if not keys:
            raise ValueError(f"split.json has no {part} questions ({part}_question_keys)")
        return list(keys)
    keys = split.get("eval_question_keys")
    if keys is None:
        logger.warning("split.json has no eval_question_keys (an old split): scoring all its questions")
        keys = split["question_keys"]
    return list(keys)


def _load(args: OpinionEvalArguments):
    from steer.persona.opinionqa import load_responses, load_waves
    from steer.persona.steering import PERSONAS_INDEX, PersonaSteeredModel

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
    data_dir = Path(args.data_dir) if args.data_dir else persona_dir.parent / "data"
    split_path = data_dir / "split.json"
    if not split_path.is_file():
        raise InputFileNotFoundError(
            f"evaluation data not found: {split_path} (written by `steer train persona`; set data_dir)"
        )
    split = _read_json(split_path)
    for key in ("waves", "question_keys"):
        if key not in split:
            raise UserInputError(f"{split_path}: missing field {key!r}")
    protocol = split.get("protocol", "individuals")
    index = _read_json(persona_dir / PERSONAS_INDEX) if (persona_dir / PERSONAS_INDEX).is_file() else {}
    check_same_run(split, index, split_path, persona_dir)
    names = index.get("names") or []
    if protocol == "groups" and names and not any(n.startswith(f"{args.group_attribute}=") for n in names):
        known = sorted({n.split("=", 1)[0] for n in names if "=" in n and not n.startswith("cohort:")})
        raise UserInputError(
            f"OpinionEvalArguments.group_attribute: {persona_dir} stores no {args.group_attribute!r} personas "
            f"(attributes it has: {known})"
        )
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


def _zero_persona(steered) -> torch.Tensor:
    return torch.zeros(1, steered.network.config.persona_dim)


def interval(values, *, paired_with=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean of ``values`` (or of ``values - paired_with``, paired by
    item) over its finite items with a percentile bootstrap interval (:mod:`steer.eval.stats`)."""
    from steer.eval.stats import bootstrap_ci

    x = np.asarray(values, dtype=np.float64)
    if paired_with is not None:
        y = np.asarray(paired_with, dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"paired values must have one shape, got {x.shape} and {y.shape}")
        x = x - y
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    low, high = bootstrap_ci(x, n_boot=n_boot, level=level, seed=seed)
    return {"mean": float(x.mean()), "low": low, "high": high, "n": int(x.size)}


def _interval(values, args: OpinionEvalArguments, paired_with=None) -> dict:
    return interval(values, paired_with=paired_with, n_boot=args.n_bootstrap, seed=args.seed)


def evaluate_individuals(
    steered, train, heldout, methods, args: OpinionEvalArguments, cohort_of=None, population=None
) -> dict:
    """Per-individual accuracy on held-out questions, for each method, with bootstrap intervals over people."""
    rng = np.random.default_rng(args.seed)
    train_row = {str(u): i for i, u in enumerate(train.user_ids)}
    candidates = [i for i in range(heldout.num_users) if heldout.observed[i].any()]
    known: list[str] = []
    if steered.embedder is not None:
        known = list(map(str, steered.embedder.user_ids))
        candidates = [i for i in candidates if str(heldout.user_ids[i]) in set(known)]
    if not candidates:
        raise ValueError("no evaluated person has held-out answers and a persona vector")
    chosen = sorted(rng.choice(candidates, size=min(args.max_users, len(candidates)), replace=False))
    items = []  # (user id, question, answer index, heldout row)
    for i in chosen:
        cols = np.nonzero(heldout.observed[i])[0]
        cols = rng.permutation(cols)[: args.max_answers_per_user]
        for j in cols:
            key = heldout.question_keys[j]
            items.append(
                (str(heldout.user_ids[i]), heldout.questions[key], int(heldout.option_index[i, j]), i)
            )
    questions = [(q.text, list(q.options)) for _, q, _, _ in items]
    users = [u for u, _, _, _ in items]
    demo_columns = [c for c in heldout.demographics.columns if heldout.demographics[c].notna().any()]
    results: dict[str, dict] = {}
    for method in methods:
        persona, preambles = None, None
        predictions = None
        if method == "population_mode":
            if population is None:
                continue
            predictions = [
                int(np.argmax(population[q.key])) if q.key in population else None for _, q, _, _ in items
            ]
        elif method == "steered":
            persona = users
        elif method == "zero":
            persona = _zero_persona(steered)
        elif method == "shuffled":
            pool = np.asarray(known or users, dtype=object)
            draws = np.random.default_rng([args.seed, 1]).integers(0, len(pool), size=len(users))
            persona = [
                str(pool[d]) if str(pool[d]) != u else str(pool[(d + 1) % len(pool)])
                for d, u in zip(draws, users)
            ]
        elif method == "cohort":
            if not cohort_of:
                logger.warning("cohort baseline skipped: the persona directory has no cohort table")
                continue
            persona = [f"cohort:{cohort_of[u]}" for u in users]
        elif method == "demographic":
            preambles = [
                demographic_preamble(_traits(heldout.demographics.iloc[row].to_dict(), demo_columns))
                for _, _, _, row in items
            ]
        elif method == "few_shot":
            preambles = []
            for user, _, _, _ in items:
                row = train_row.get(user)
                shots = []
                if row is not None:
                    cols = np.nonzero(train.observed[row])[0]
                    for j in np.random.default_rng([args.seed, row]).permutation(cols)[: args.few_shot_k]:
                        q = train.questions[train.question_keys[j]]
                        shots.append((q.text, q.options[int(train.option_index[row, j])]))
                preambles.append(few_shot_preamble(shots) if shots else None)
        elif method != "raw":
            continue
        if predictions is None:
            probs = steered.option_probs_batch(
                questions,
                persona,
                preambles=preambles,
                batch_size=args.batch_size,
                desc=f"individuals / {method}",
            )
            predictions = [int(p.argmax()) for p in probs]
        correct: dict[str, list[bool]] = defaultdict(list)
        for (user, _, answer, _), prediction in zip(items, predictions):
            if prediction is not None:
                correct[user].append(prediction == answer)
        per_person = [float(np.mean(v)) for v in correct.values() if v]
        results[method] = {
            "accuracy_macro": macro_accuracy(correct),
            "accuracy_micro": float(np.mean([c for v in correct.values() for c in v]))
            if per_person
            else math.nan,
            "interval": _interval(per_person, args),
        }
        logger.info("individuals / %s: %s", method, results[method])
    return {
        "num_people": len(chosen),
        "num_answers": len(items),
        "num_questions": len({q.key for _, q, _, _ in items}),
        "methods": results,
        "not_defined": {"mf": "held-out questions are unknown to the embedder"},
    }


def _train_twins(eval_keys, train_keys, questions) -> dict[str, str]:
    """Evaluation question -> a training question with the same stem and options (questions that repeat)."""
    by_stem: dict[str, str] = {}
    for key in train_keys:
        if key in questions:
            by_stem.setdefault(_stem(key), key)
    twins = {}
    for key in eval_keys:
        twin = by_stem.get(_stem(key))
        if twin is not None and questions[twin].options == questions[key].options:
            twins[key] = twin
    return twins


def evaluate_groups(steered, split, methods, args: OpinionEvalArguments) -> dict:
    """Representativeness toward each group of ``args.group_attribute`` and every folded-in group, on the
    scored questions of ``split``, against the real Pew distributions (see the module docstring)."""
    from steer.persona.groups import load_group_table, parse_group_name

    attribute = args.group_attribute
    fold_in = [g for g in split.get("fold_in", {}) if g in steered.personas]
    attributes = list(dict.fromkeys([attribute] + [parse_group_name(g)[0] for g in fold_in]))
    table = load_group_table(split.get("opinionqa_dir"), split["waves"], attributes=attributes)
    train_keys = set(split.get("train_question_keys") or [])
    keys = [k for k in eval_question_keys(split, args.split) if k in table.probs]
    leaked = sorted(set(keys) & train_keys)
    if leaked and args.split != "train":
        raise ValueError(f"split.json scores questions that training used: {leaked[:5]}")
    if args.max_questions is not None and len(keys) > args.max_questions:
        rng = np.random.default_rng(args.seed)
        keys = sorted(rng.choice(keys, size=args.max_questions, replace=False).tolist())
    prefix = f"{attribute}="
    groups = [g for g in table.names if g.startswith(prefix) and g in steered.personas]
    if not groups:
        raise ValueError(
            f"the persona directory stores no {attribute} personas (known: {sorted(steered.personas)[:8]})"
        )
    scored = groups + [g for g in fold_in if g in table.names]
    if not keys:
        raise ValueError("no scored question has real group distributions")
    questions = {k: table.questions[k] for k in keys}
    text = {k: (questions[k].text, list(questions[k].options)) for k in keys}
    real = {(g, k): table.distribution(g, k) for g in table.names for k in keys}
    pool = [g for g in split.get("train_groups", []) if g in steered.personas] or [
        g for g in steered.personas if "=" in g and g not in fold_in
    ]
    methods = [m for m in methods if m in GROUP_METHODS]
    if "wrong_group" in methods and "steered" not in methods:
        methods = ["steered", *methods]
    outputs: dict[str, dict[tuple[str, str], np.ndarray]] = {}

    def run(method: str, rows: list[tuple[str, str]], persona, preambles=None) -> None:
        probs = steered.option_probs_batch(
            [text[k] for _, k in rows],
            persona,
            preambles=preambles,
            batch_size=args.batch_size,
            desc=f"groups / {method}",
        )
        outputs[method] = {row: p.numpy().astype(np.float64) for row, p in zip(rows, probs)}
        logger.info("groups / %s: %d prompts", method, len(rows))

    pairs = [(g, k) for g in scored for k in keys]
    same_attribute = {
        g: [h for h in table.names if parse_group_name(h)[0] == parse_group_name(g)[0] and h != g]
        for g in scored
    }
    # the steered outputs of every group's peers (same attribute) give its wrong-group ablation
    peers = [h for g in scored for h in same_attribute[g] if h in steered.personas and h not in scored]
    steer_pairs = pairs + [(h, k) for h in dict.fromkeys(peers) for k in keys]
    shared = {"raw": None, "zero": _zero_persona(steered)}
    for method in methods:
        if method in shared:
            run(method, [("*", k) for k in keys], shared[method])
            outputs[method] = {(g, k): outputs[method][("*", k)] for g, k in pairs}
        elif method == "steered":
            run(method, steer_pairs, [g for g, _ in steer_pairs])
        elif method == "shuffled":
            rng = np.random.default_rng([args.seed, 2])
            others = []
            for g, _ in pairs:
                candidates = [p for p in pool if p != g]
                others.append(candidates[int(rng.integers(len(candidates)))])
            run(method, pairs, others)
        elif method == "demographic":
            preambles = [
                demographic_preamble({parse_group_name(g)[0]: parse_group_name(g)[1]}) for g, _ in pairs
            ]
            run(method, pairs, None, preambles)
        elif method == "few_shot":
            preambles = []
            shot_keys = sorted(train_keys & set(table.probs))
            for g, k in pairs:
                rng = np.random.default_rng([args.seed, scored.index(g), keys.index(k)])
                shots = []
                for key in rng.permutation(shot_keys) if shot_keys else []:
                    dist = table.distribution(g, key)
                    if dist is not None:
                        shots.append(
                            (table.questions[key].text, table.questions[key].options[int(dist.argmax())])
                        )
                    if len(shots) >= args.few_shot_k:
                        break
                preambles.append(group_few_shot_preamble(shots) if shots else None)
            run(method, pairs, None, preambles)

    twins = _train_twins(keys, sorted(train_keys), table.questions)
    reference = {
        "population": lambda g, k: table.population[k],
        "majority": lambda g, k: np.eye(len(table.population[k]))[int(np.argmax(table.population[k]))],
        "uniform": lambda g, k: np.full(questions[k].num_options, 1.0 / questions[k].num_options),
        "train_frequency": lambda g, k: table.population[twins[k]] if k in twins else None,
        "group_train_frequency": lambda g, k: table.distribution(g, twins[k]) if k in twins else None,
    }
    for method in methods:
        if method in reference:
            outputs[method] = {(g, k): reference[method](g, k) for g, k in pairs}

    def rep_any(p, g, k) -> float:  # any question of the table (the text baselines' validation choice)
        q = table.distribution(g, k)
        if p is None or q is None:
            return math.nan
        return representativeness(p / p.sum(), q, table.questions[k].scaled)

    text_records = {}
    wanted_text = [m for m in methods if m in TEXT_BASELINES]
    if wanted_text:
        valid_keys = [k for k in split.get("valid_question_keys") or [] if k in table.probs]
        fold_keys = {g: split.get("fold_in", {}).get(g, {}).get("question_keys") for g in scored}
        fitted = fit_text_baselines(
            table,
            sorted(train_keys & set(table.probs)),
            valid_keys,
            scored,
            rep_any,
            group_keys={g: v for g, v in fold_keys.items() if v},
        )
        for name in wanted_text:
            baseline, text_records[name] = fitted[name]
            outputs[name] = {(g, k): baseline.predict(g, k) for g, k in pairs}
            logger.info("groups / %s: %d predictions (no LLM)", name, len(pairs))

    def rep(p, g, k) -> float:
        q = real[(g, k)]
        if p is None or q is None:
            return math.nan
        return representativeness(p / p.sum(), q, questions[k].scaled)

    scores: dict[str, dict[str, np.ndarray]] = {}
    for method, out in outputs.items():
        scores[method] = {g: np.asarray([rep(out.get((g, k)), g, k) for k in keys]) for g in scored}
    if "steered" in outputs:
        # wrong group: this group's real distribution scored against the outputs steered by its peers
        scores["wrong_group"] = {}
        for g in scored:
            others = [h for h in same_attribute[g] if (h, keys[0]) in outputs["steered"]]
            if others:
                rows = [[rep(outputs["steered"][(h, k)], g, k) for h in others] for k in keys]
                scores["wrong_group"][g] = np.nanmean(np.asarray(rows), 1)
    # specificity: own persona minus the peers' personas, on this group's real distribution (exactly 0 for a
    # persona-blind model); the real data's value is 1 - mean_h rep(real_h, real_g)
    specificity, real_specificity = {}, {}
    for g in scored:
        others = same_attribute[g]
        if not others:
            continue
        with np.errstate(all="ignore"):
            real_other = np.asarray([np.nanmean([rep(real[(h, k)], g, k) for h in others]) for k in keys])
        real_specificity[g] = _interval(1.0 - real_other, args)
        if "wrong_group" in scores and g in scores["wrong_group"]:
            specificity[g] = _interval(scores["steered"][g], args, paired_with=scores["wrong_group"][g])

    results: dict[str, dict] = {}
    for method, per_group in scores.items():
        if not all(g in per_group for g in groups):
            continue
        stacked = np.asarray([per_group[g] for g in groups])
        with np.errstate(all="ignore"):
            mean_over_groups = np.where(np.isfinite(stacked).all(0), stacked.mean(0), np.nan)
        results[method] = {
            "per_group": {g: _interval(per_group[g], args) for g in scored if g in per_group},
            "mean": _interval(mean_over_groups, args),
        }
    contrasts: dict[str, dict] = {}
    if "steered" in scores:
        for other in CONTRASTS:
            if other not in scores:
                continue
            contrasts[f"steered - {other}"] = {
                g: _interval(scores["steered"][g], args, paired_with=scores[other][g])
                for g in scored
                if g in scores[other]
            }
    # the TV distance between the steered outputs of two groups vs between their real distributions
    separation = {}
    if "steered" in outputs and len(groups) >= 2:
        for i, g in enumerate(groups):
            for h in groups[i + 1 :]:
                model_tv = [
                    0.5 * np.abs(outputs["steered"][(g, k)] - outputs["steered"][(h, k)]).sum() for k in keys
                ]
                real_tv = [
                    0.5 * np.abs(real[(g, k)] - real[(h, k)]).sum()
                    for k in keys
                    if real[(g, k)] is not None and real[(h, k)] is not None
                ]
                separation[f"{g} vs {h}"] = {
                    "model_tv": float(np.mean(model_tv)),
                    "real_tv": float(np.mean(real_tv)),
                }
    direction = direction_agreement(outputs, real, questions, groups, keys, args)
    cohorts = {}
    if "steered" in outputs and args.cohorts:
        by_key = {m: {k: outputs[m][(groups[0], k)] for k in keys} for m in ("raw", "zero") if m in outputs}
        cohorts = evaluate_cohorts(steered, split, keys, questions, by_key, args)
    return {
        "attribute": attribute,
        "groups": groups,
        "fold_in_groups": [g for g in scored if g not in groups],
        "fold_in": {g: split.get("fold_in", {}).get(g, {}) for g in scored if g not in groups},
        "num_questions": len(keys),
        "question_keys": keys,
        "eval_waves": split.get(f"{args.split}_waves"),
        "split": args.split,
        "train_twins": len(twins),
        "methods": results,
        "contrasts": contrasts,
        "specificity": specificity,
        "real_specificity": real_specificity,
        "separation": separation,
        "direction": direction,
        "cohorts": cohorts,
        "text_baselines": text_records,
        "not_defined": {
            "mf": "the evaluated questions are unknown to the embedder (it saw only training questions)",
            **({} if twins else {"train_frequency": "no evaluated question repeats a training question"}),
        },
    }


def evaluate_cohorts(steered, split, keys, questions, persona_blind: dict, args) -> dict:
    """The paper's cluster personas scored like groups: k-means cohorts of the training groups' persona vectors
    (stored by training as ``cohort:<c>``, else clustered here the same way), each cohort's real distribution the
    mean of its member groups' distributions; representativeness of the steered centroid, paired differences to
    the persona-blind methods in ``persona_blind`` (``{"raw": {key: p}, ...}``) and the cohort specificity (own
    centroid minus the other cohorts' centroids, on this cohort's real distribution)."""
    from steer.persona.data import cluster_groups
    from steer.persona.groups import load_group_table

    attributes = split.get("group_attributes")
    if not attributes:
        return {}
    table = load_group_table(split.get("opinionqa_dir"), split["waves"], attributes=attributes)
    members = split.get("group_cohorts")
    centroids = {f"cohort:{c}": steered.personas.get(f"cohort:{c}") for c in members or {}}
    if not members or any(v is None for v in centroids.values()):
        if steered.embedder is None:
            return {}
        groups = [str(u) for u in steered.embedder.user_ids]
        train = [k for k in split.get("train_question_keys", []) if k in table.probs]
        centroids, members = cluster_groups(
            steered.embedder, table.to_responses(groups, train), groups, seed=args.seed
        )
    if len(members) < 2:
        return {}
    names = sorted(members, key=int)
    real = {}
    for c in names:
        for k in keys:
            dists = [table.distribution(m, k) for m in members[c] if m in table.names]
            dists = [d for d in dists if d is not None]
            real[(c, k)] = np.mean(dists, 0) if dists else None
    rows = [(c, k) for c in names for k in keys]
    vectors = torch.stack([centroids[f"cohort:{c}"].reshape(-1) for c, _ in rows])
    probs = steered.option_probs_batch(
        [(questions[k].text, list(questions[k].options)) for _, k in rows],
        vectors,
        batch_size=args.batch_size,
        desc="cohorts / steered",
    )
    out = {row: p.numpy().astype(np.float64) for row, p in zip(rows, probs)}

    def rep(p, c, k) -> float:
        q = real[(c, k)]
        if p is None or q is None:
            return math.nan
        return representativeness(p / p.sum(), q / q.sum(), questions[k].scaled)

    result = {}
    for c in names:
        steered_c = np.asarray([rep(out[(c, k)], c, k) for k in keys])
        others = np.asarray([np.nanmean([rep(out[(d, k)], c, k) for d in names if d != c]) for k in keys])
        entry = {
            "members": members[c],
            "steered": _interval(steered_c, args),
            "specificity": _interval(steered_c, args, paired_with=others),
        }
        for method, by_key in persona_blind.items():
            blind = np.asarray([rep(by_key.get(k), c, k) for k in keys])
            entry[method] = _interval(blind, args)
            entry[f"steered - {method}"] = _interval(steered_c, args, paired_with=blind)
        result[c] = entry
    return result


# methods whose outputs can differ between groups (a persona-blind method never gets a direction right)
DIRECTION_METHODS = ("steered", "demographic", "few_shot", "text_ridge", "text_knn", "group_train_frequency")


def _expected(p: np.ndarray, scale) -> float:
    p = np.asarray(p, dtype=np.float64)
    return float(np.dot(p / p.sum(), np.asarray(scale, dtype=np.float64)))


def direction_agreement(outputs, real, questions, groups, keys, args) -> dict:
    """Per pair of groups ``g - h``: on the questions where their real expected scaled answers differ by at
    least ``DIRECTION_MIN_GAP``, the share where a method's ``g - h`` difference has the real sign (a tie counts
    as wrong), with a bootstrap interval over those questions; and Pearson's r of the two differences over all
    scored questions."""
    result = {}
    for i, g in enumerate(groups):
        for h in groups[i + 1 :]:
            gaps = {
                k: _expected(real[(g, k)], questions[k].scaled) - _expected(real[(h, k)], questions[k].scaled)
                for k in keys
                if real.get((g, k)) is not None and real.get((h, k)) is not None
            }
            counted = [k for k, v in gaps.items() if abs(v) >= DIRECTION_MIN_GAP]
            methods = {}
            for method in DIRECTION_METHODS:
                out = outputs.get(method)
                if not out:
                    continue
                model = {}
                for k in gaps:
                    a, b = out.get((g, k)), out.get((h, k))
                    if a is not None and b is not None:
                        model[k] = _expected(a, questions[k].scaled) - _expected(b, questions[k].scaled)
                right = [float(np.sign(model[k]) == np.sign(gaps[k])) for k in counted if k in model]
                shared = [k for k in gaps if k in model]
                r = math.nan
                if len(shared) > 2:
                    x = np.asarray([model[k] for k in shared])
                    y = np.asarray([gaps[k] for k in shared])
                    if x.std() > 0 and y.std() > 0:
                        r = float(np.corrcoef(x, y)[0, 1])
                methods[method] = {"sign_right": _interval(np.asarray(right), args), "pearson_r": r}
            result[f"{g} - {h}"] = {
                "questions": len(counted),
                "min_gap": DIRECTION_MIN_GAP,
                "methods": methods,
            }
    return result


def _fmt_interval(value: dict | None, digits: int = 3) -> str:
    if not value or value.get("n", 0) == 0 or value.get("mean") is None or not math.isfinite(value["mean"]):
        return "–"
    return f"{value['mean']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"


def _chart(groups: dict, path: Path) -> Path:
    """Per-group representativeness of every method and the group specificity, each with its 95% interval."""
    from steer.eval.report import bar_chart

    names = groups["groups"] + groups.get("fold_in_groups", [])
    rows = []
    for method, values in groups["methods"].items():
        row = {"run": method}
        for g in names:
            row[f"rep:{g}"] = values["per_group"].get(g)
        rows.append(row)
    rows.append({"run": "specificity", **{f"spec:{g}": groups["specificity"].get(g) for g in names}})
    rows.append(
        {"run": "specificity (real data)", **{f"spec:{g}": groups["real_specificity"].get(g) for g in names}}
    )
    metrics = [f"rep:{g}" for g in names] + [f"spec:{g}" for g in names if groups["specificity"].get(g)]
    labels = {f"rep:{g}": f"representativeness\n{g}" for g in names}
    labels.update({f"spec:{g}": f"group specificity\n{g}" for g in names})
    split = {"eval": "evaluation waves", "within": "within-wave held out", "valid": "validation"}
    return bar_chart(
        rows,
        metrics,
        path,
        title=f"Persona steering on OpinionQA ({split.get(groups.get('split'), groups.get('split'))}; 95% intervals)",
        labels=labels,
    )


def opinion_markdown(result: dict) -> str:
    """The markdown report: every metric as ``mean [95% interval]`` with its count."""
    from steer.eval.report import markdown_table

    lines = [f"# OpinionQA persona evaluation: {result['run_name']}", ""]
    if result.get("groups", {}).get("split") == "valid":
        lines += [
            "**Validation questions** (for choices only; the reported numbers use the evaluation waves).",
            "",
        ]
    groups = result.get("groups")
    if groups:
        names = groups["groups"] + groups.get("fold_in_groups", [])
        lines.append(
            f"Representativeness 1 - WD/(max-min) toward each {groups['attribute']} group against the real Pew "
            f"distributions on {groups['num_questions']} "
            + {
                "eval": "unseen questions (evaluation waves ",
                "within": "unseen questions of the training waves (within-wave held out; waves ",
                "valid": "validation questions (waves ",
            }.get(groups.get("split", "eval"), "TRAINING questions, a diagnostic of fit only (waves ")
            + f"{groups.get('eval_waves')}); mean [95% bootstrap interval over questions]. "
            f"Folded-in groups: {groups.get('fold_in_groups') or 'none'}.\n"
        )
        rows = []
        for method, values in groups["methods"].items():
            row = {"method": method}
            for g in names:
                row[g] = _fmt_interval(values["per_group"].get(g))
            row["n"] = max((v or {}).get("n", 0) for v in values["per_group"].values())
            row["mean (party groups)"] = _fmt_interval(values["mean"])
            rows.append(row)
        lines.append(markdown_table(rows, ["method", *names, "mean (party groups)", "n"]))
        if groups["contrasts"]:
            lines.append(
                "\nPaired differences (steered minus method), mean [95% paired bootstrap interval]:\n"
            )
            rows = [
                {"contrast": name, **{g: _fmt_interval(v.get(g)) for g in names}}
                for name, v in groups["contrasts"].items()
            ]
            lines.append(markdown_table(rows, ["contrast", *names]))
        if groups["specificity"]:
            lines.append(
                "\nGroup specificity rep(steered_g, real_g) - mean_h rep(steered_h, real_g) over the other groups h of "
                "the same attribute (own persona minus the wrong personas, on g's real answers; 0 for a persona-blind "
                "model), and the real data's own value 1 - mean_h rep(real_h, real_g):\n"
            )
            rows = [
                {
                    "group": g,
                    "steered": _fmt_interval(groups["specificity"].get(g)),
                    "real": _fmt_interval(groups["real_specificity"].get(g)),
                    "n": (groups["specificity"].get(g) or {}).get("n"),
                }
                for g in names
            ]
            lines.append(markdown_table(rows, ["group", "steered", "real", "n"]))
        if groups.get("direction"):
            lines.append(
                "\nDirection: on the questions where two groups' real expected scaled answers differ by at least "
                f"{DIRECTION_MIN_GAP}, the share where a method's difference has the real sign [95% bootstrap "
                "interval over those questions] (a persona-blind method scores 0), and Pearson's r of the two "
                "differences over all scored questions:\n"
            )
            rows = []
            for pair, value in groups["direction"].items():
                for method, entry in value["methods"].items():
                    rows.append(
                        {
                            "pair": pair,
                            "method": method,
                            "sign right": _fmt_interval(entry["sign_right"]),
                            "n": entry["sign_right"]["n"],
                            "r": entry["pearson_r"],
                        }
                    )
            lines.append(markdown_table(rows, ["pair", "method", "sign right", "n", "r"]))
        if groups.get("cohorts"):
            lines.append(
                "\nCohorts (k-means over the training groups' persona vectors; real distribution = the mean of the "
                "member groups'): representativeness of the steered centroid, paired differences, and the cohort "
                "specificity (own centroid minus the other cohorts' centroids):\n"
            )
            blind = [m for m in ("raw", "zero") if any(m in v for v in groups["cohorts"].values())]
            rows = []
            for c, entry in groups["cohorts"].items():
                row = {
                    "cohort": c,
                    "members": len(entry["members"]),
                    "steered": _fmt_interval(entry["steered"]),
                }
                for m in blind:
                    row[f"steered - {m}"] = _fmt_interval(entry.get(f"steered - {m}"))
                row["specificity"] = _fmt_interval(entry["specificity"])
                row["n"] = entry["steered"]["n"]
                rows.append(row)
            lines.append(
                markdown_table(
                    rows,
                    ["cohort", "members", "steered", *[f"steered - {m}" for m in blind], "specificity", "n"],
                )
            )
        if groups.get("text_baselines"):
            chosen = "; ".join(
                f"{name}: {record['chosen']} ({record['chosen_on']}, mean representativeness "
                f"{record['valid_score']:.3f})"
                for name, record in groups["text_baselines"].items()
            )
            lines.append(f"\nText baselines (no LLM), settings chosen on the validation questions: {chosen}.")
        if groups.get("separation"):
            rows = [{"pair": k, **v} for k, v in groups["separation"].items()]
            lines.append("\nMean total-variation distance between two groups' answer distributions:\n")
            lines.append(markdown_table(rows, ["pair", "model_tv", "real_tv"]))
        if groups.get("not_defined"):
            lines.append(
                "\nNot defined here: " + "; ".join(f"{k}: {v}" for k, v in groups["not_defined"].items())
            )
    individuals = result.get("individuals")
    if individuals:
        lines.append(
            f"\nPer-individual accuracy on held-out questions ({individuals['num_people']} people, "
            f"{individuals['num_answers']} answers, {individuals['num_questions']} questions), macro-averaged "
            "over people [95% bootstrap interval over people]:\n"
        )
        rows = [
            {
                "method": m,
                "accuracy_macro": _fmt_interval(v["interval"]),
                "accuracy_micro": v["accuracy_micro"],
            }
            for m, v in individuals["methods"].items()
        ]
        lines.append(markdown_table(rows, ["method", "accuracy_macro", "accuracy_micro"]))
    return "\n".join(lines) + "\n"


def write_opinion_report(result: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """``opinions.json`` (run result), ``opinions.md`` and ``opinions.png`` (per-group chart)."""
    from steer.eval.report import write_json
    from steer.io import atomic_write_text

    output_dir = Path(output_dir)
    paths = {
        "json": write_json(output_dir / "opinions.json", result),
        "markdown": atomic_write_text(output_dir / "opinions.md", opinion_markdown(result)),
    }
    if result.get("groups"):
        paths["png"] = _chart(result["groups"], output_dir / "opinions.png")
    return paths


def run_opinion_eval(args: OpinionEvalArguments) -> dict:
    """Evaluate a trained persona directory; writes the report into ``args.output_dir`` and returns it."""
    import time

    start = time.perf_counter()
    steered, split, index, train, heldout = _load(args)
    groups = evaluate_groups(steered, split, args.methods, args)
    individuals = None
    if train is not None:
        from steer.persona.groups import load_group_table

        try:
            table = load_group_table(split.get("opinionqa_dir"), split["waves"], attributes=["POLPARTY"])
            population = table.population
        except (FileNotFoundError, ValueError) as err:
            logger.warning("population_mode baseline skipped: %s", err)
            population = None
        individual_methods = [m for m in args.methods if m in INDIVIDUAL_METHODS]
        individuals = evaluate_individuals(
            steered,
            train,
            heldout,
            individual_methods,
            args,
            cohort_of=index.get("cohort_of_user"),
            population=population,
        )
    metrics = {}
    for method, values in groups["methods"].items():
        if values["mean"]["n"]:  # methods not defined on any scored question are left out
            metrics[f"representativeness/{method}"] = values["mean"]["mean"]
    for g, value in groups["specificity"].items():
        metrics[f"specificity/{g}"] = value["mean"]
    if individuals:
        for method, values in individuals["methods"].items():
            metrics[f"accuracy_macro/{method}"] = values["accuracy_macro"]
    result = {
        "schema": RESULT_SCHEMA,
        "run_name": args.run_name,
        "protocol": split.get("protocol", "individuals"),
        "metrics": metrics,
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
