"""OpinionQA evaluation of persona steering (``steer eval opinions``).

Two metrics, each for the steered model and for baselines on the same questions:

* **per-individual accuracy** (Li et al. 2024): for each evaluated person, the share of their held-out
  answers whose option gets the highest probability; macro-averaged over people.
* **representativeness** (Santurkar et al. 2023) toward each demographic group:
  ``1 - WD(p_model, p_group) / (max - min ordinal)`` per question, with the REAL Pew group answer
  distributions (``<ATTR>_data.json``) and the Wasserstein-1 distance on the ordinal scale; averaged
  over questions, per group and overall.

Methods: ``steered`` (the person's / group centroid's persona vector), ``steered_members`` (groups only:
the mixture of the option distributions of up to ``group_members`` members of the group, each steered by
their own persona vector), ``raw`` (the bare question),
``demographic`` (the person's or group's demographics described in words), ``few_shot`` (K of the
person's own training answers in the prompt; individuals only), ``random`` (an untrained soft-prompt
network of the same shape) and ``cohort`` (the person's cohort centroid; individuals only).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

RESULT_SCHEMA = "steer.eval.opinions/v1"
METHODS = ("steered", "steered_members", "raw", "demographic", "few_shot", "random", "cohort")
GROUP_METHODS = ("steered", "steered_members", "raw", "demographic", "random")
INDIVIDUAL_METHODS = ("steered", "raw", "demographic", "few_shot", "random", "cohort")
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
        default_factory=lambda: ["steered", "steered_members", "raw", "demographic", "few_shot", "random"],
        metadata={"help": f"Methods to evaluate, from {list(METHODS)}."},
    )
    max_users: int = field(default=40, metadata={"help": "People evaluated for per-individual accuracy."})
    max_answers_per_user: int = field(default=8, metadata={"help": "Held-out answers per person (at most)."})
    few_shot_k: int = field(
        default=3, metadata={"help": "Own training answers shown by the few_shot baseline."}
    )
    group_attribute: str = field(
        default="POLPARTY", metadata={"help": "Attribute whose groups are scored for representativeness."}
    )
    max_questions: int = field(default=30, metadata={"help": "Questions scored for representativeness."})
    group_members: int = field(
        default=8, metadata={"help": "Members per group averaged by the steered_members method."}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype (float32 default)."})
    device: str | None = field(
        default=None, metadata={"help": "Device (default: cuda if available, else cpu)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the user / question / few-shot choices."})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"OpinionEvalArguments.methods: unknown {unknown}; choose from {list(METHODS)}")


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


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


def _load(args: OpinionEvalArguments):
    from steer.persona.opinionqa import load_responses, load_waves
    from steer.persona.steering import PERSONAS_INDEX, PersonaSteeredModel

    persona_dir = Path(args.persona_dir)
    if not args.persona_dir or not persona_dir.is_dir():
        raise FileNotFoundError(
            f"persona_dir not found: {args.persona_dir!r} (train with `steer train persona`)"
        )
    data_dir = Path(args.data_dir) if args.data_dir else persona_dir.parent / "data"
    split_path = data_dir / "split.json"
    for path in (split_path, data_dir / "train.csv", data_dir / "heldout.csv"):
        if not path.is_file():
            raise FileNotFoundError(f"evaluation data not found: {path} (written by `steer train persona`)")
    split = json.loads(split_path.read_text())
    for key in ("waves", "question_keys"):
        if key not in split:
            raise ValueError(f"{split_path}: missing field {key!r}")
    index = (
        json.loads((persona_dir / PERSONAS_INDEX).read_text())
        if (persona_dir / PERSONAS_INDEX).is_file()
        else {}
    )
    base = args.model_name_or_path or index.get("base_model")
    if not base:
        raise ValueError("model_name_or_path is not set and the persona directory records no base_model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    steered = PersonaSteeredModel.from_pretrained(base, persona_dir, dtype=args.dtype, device=device)
    questions = load_waves(split.get("opinionqa_dir"), split["waves"])
    questions = {k: questions[k] for k in split["question_keys"] if k in questions}
    train = load_responses(data_dir / "train.csv", questions)
    heldout = load_responses(data_dir / "heldout.csv", questions)
    return steered, split, index, train, heldout


def _random_twin(steered, seed: int):
    from steer.persona.soft_prompt import SoftPromptNetwork
    from steer.persona.steering import PersonaSteeredModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = SoftPromptNetwork.from_config(steered.network.config)
    return PersonaSteeredModel(
        steered.model,
        steered.tokenizer,
        network,
        embedder=steered.embedder,
        personas=steered.personas,
        prompt_format=steered.prompt_format,
    )


def evaluate_individuals(
    steered, train, heldout, methods, args: OpinionEvalArguments, cohort_of=None, random_model=None
) -> dict:
    """Per-individual accuracy on held-out answers, for each method."""
    rng = np.random.default_rng(args.seed)
    train_row = {str(u): i for i, u in enumerate(train.user_ids)}
    candidates = [i for i in range(heldout.num_users) if heldout.observed[i].any()]
    if steered.embedder is not None:
        known = set(map(str, steered.embedder.user_ids))
        candidates = [i for i in candidates if str(heldout.user_ids[i]) in known]
    if not candidates:
        raise ValueError("no evaluated person has held-out answers and a persona vector")
    chosen = sorted(rng.choice(candidates, size=min(args.max_users, len(candidates)), replace=False))
    items = []  # (user id, question, answer index, train row)
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
        persona, preambles, model = None, None, steered
        if method == "steered":
            persona = users
        elif method == "random":
            persona, model = users, random_model
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
        probs = model.option_probs_batch(questions, persona, preambles=preambles, batch_size=args.batch_size)
        correct: dict[str, list[bool]] = defaultdict(list)
        for (user, _, answer, _), p in zip(items, probs):
            correct[user].append(int(p.argmax()) == answer)
        results[method] = {
            "accuracy_macro": macro_accuracy(correct),
            "accuracy_micro": float(np.mean([c for v in correct.values() for c in v])),
        }
        logger.info("individuals / %s: %s", method, results[method])
    return {"num_people": len(chosen), "num_answers": len(items), "methods": results}


def _group_members(train, attribute: str, groups: Sequence[str], known: set[str], k: int, seed: int) -> dict:
    """Up to ``k`` user ids per group value of ``attribute`` (users with a persona vector only)."""
    if train is None or attribute not in train.demographics.columns:
        return {}
    values = train.demographics[attribute].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    out = {}
    for group in groups:
        members = [str(u) for u, v in zip(train.user_ids, values) if v == group and str(u) in known]
        if members:
            out[group] = sorted(rng.choice(members, size=min(k, len(members)), replace=False).tolist())
    return out


def evaluate_groups(
    steered, split, methods, args: OpinionEvalArguments, random_model=None, train=None
) -> dict:
    """Representativeness toward each group of ``args.group_attribute`` against the real Pew distributions."""
    from steer.persona.opinionqa import group_distributions, load_wave, wave_dirs

    attribute = args.group_attribute
    keys = set(split["question_keys"])
    human = {}
    for directory in wave_dirs(split.get("opinionqa_dir"), split["waves"]):
        wave_questions = load_wave(directory)
        for key, dist in group_distributions(directory, attribute, questions=wave_questions).items():
            if key in keys and not dist.question.is_nominal:
                human[key] = dist
    prefix = f"{attribute}="
    groups = sorted(k[len(prefix) :] for k in steered.personas if k.startswith(prefix))
    if not groups:
        raise ValueError(f"the persona directory stores no {attribute} centroids (demographic_attributes)")
    rng = np.random.default_rng(args.seed)
    chosen = sorted(human)
    if len(chosen) > args.max_questions:
        chosen = sorted(rng.choice(chosen, size=args.max_questions, replace=False).tolist())
    pairs = []  # (group, question key, human probs)
    for group in groups:
        for key in chosen:
            dist = human[key]
            if (group,) not in dist.groups:
                continue
            p = dist.probs[dist.group_index(group)]
            if not np.isnan(p).any():
                pairs.append((group, key, p))
    if not pairs:
        raise ValueError(f"no {attribute} group has real Pew distributions on the evaluated questions")
    questions = {k: human[k].question for k in chosen}
    raw_cache: dict[str, np.ndarray] = {}
    results: dict[str, dict] = {}
    for method in methods:
        if method not in GROUP_METHODS:
            continue
        if method == "steered_members":
            known = set(map(str, steered.embedder.user_ids)) if steered.embedder is not None else set()
            members = _group_members(train, attribute, groups, known, args.group_members, args.seed)
            if not members:
                logger.warning("steered_members skipped: no group members with persona vectors")
                continue
            rows = [(g, k, p) for g, k, p in pairs if g in members]
            flat_q, flat_p = [], []
            for group, key, _ in rows:
                for user in members[group]:
                    flat_q.append((questions[key].text, list(questions[key].options)))
                    flat_p.append(user)
            probs = steered.option_probs_batch(flat_q, flat_p, batch_size=args.batch_size)
            model_probs, start = [], 0
            for group, _, _ in rows:
                n = len(members[group])
                model_probs.append(torch.stack(probs[start : start + n]).mean(0).numpy())
                start += n
            method_pairs = rows
        elif method == "raw":
            todo = [k for k in chosen if k not in raw_cache]
            probs = steered.option_probs_batch(
                [(questions[k].text, list(questions[k].options)) for k in todo],
                None,
                batch_size=args.batch_size,
            )
            raw_cache.update({k: p.numpy() for k, p in zip(todo, probs)})
            model_probs = [raw_cache[k] for _, k, _ in pairs]
            method_pairs = pairs
        else:
            model = random_model if method == "random" else steered
            persona = [f"{prefix}{g}" for g, _, _ in pairs] if method in ("steered", "random") else None
            preambles = (
                [demographic_preamble({attribute: g}) for g, _, _ in pairs]
                if method == "demographic"
                else None
            )
            probs = model.option_probs_batch(
                [(questions[k].text, list(questions[k].options)) for _, k, _ in pairs],
                persona,
                preambles=preambles,
                batch_size=args.batch_size,
            )
            model_probs = [p.numpy() for p in probs]
            method_pairs = pairs
        per_group: dict[str, list[float]] = defaultdict(list)
        for (group, key, p_human), p_model in zip(method_pairs, model_probs):
            support = questions[key].scaled
            per_group[group].append(representativeness(p_model / p_model.sum(), p_human, support))
        group_scores = {g: float(np.mean(v)) for g, v in per_group.items()}
        results[method] = {"per_group": group_scores, "mean": float(np.mean(list(group_scores.values())))}
        logger.info("groups / %s: %s", method, results[method])
    return {"attribute": attribute, "groups": groups, "num_questions": len(chosen), "methods": results}


def _chart(individuals: dict, groups: dict, path: Path) -> Path:
    from steer.eval.report import bar_chart

    methods = list(dict.fromkeys(list(individuals["methods"]) + list(groups["methods"])))
    rows, metrics, labels = [], [], {}
    if individuals["methods"]:
        metrics.append("accuracy_macro")
        labels["accuracy_macro"] = "per-individual accuracy"
    for group in groups["groups"]:
        metrics.append(f"rep:{group}")
        labels[f"rep:{group}"] = f"representativeness\n{groups['attribute']}={group}"
    for method in methods:
        row = {"run": method}
        if method in individuals["methods"]:
            row["accuracy_macro"] = individuals["methods"][method]["accuracy_macro"]
        if method in groups["methods"]:
            for group, value in groups["methods"][method]["per_group"].items():
                row[f"rep:{group}"] = value
        rows.append(row)
    return bar_chart(rows, metrics, path, title="Persona steering on OpinionQA", labels=labels)


def write_opinion_report(result: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """``opinions.json`` (run result), ``opinions.md`` and ``opinions.png`` (per-group chart)."""
    from steer.eval.report import atomic_write_text, markdown_table, write_json

    output_dir = Path(output_dir)
    individuals, groups = result["individuals"], result["groups"]
    lines = [f"# OpinionQA persona evaluation: {result['run_name']}", ""]
    lines.append(
        f"Per-individual accuracy on held-out answers ({individuals['num_people']} people, "
        f"{individuals['num_answers']} answers), macro-averaged over people:\n"
    )
    lines.append(
        markdown_table(
            [{"method": m, **v} for m, v in individuals["methods"].items()],
            ["method", "accuracy_macro", "accuracy_micro"],
        )
    )
    lines.append(
        f"\nRepresentativeness 1 - WD/(max-min) toward each {groups['attribute']} group against the real Pew "
        f"distributions ({groups['num_questions']} questions):\n"
    )
    columns = ["method", *groups["groups"], "mean"]
    rows = [{"method": m, **v["per_group"], "mean": v["mean"]} for m, v in groups["methods"].items()]
    lines.append(markdown_table(rows, columns))
    paths = {
        "json": write_json(output_dir / "opinions.json", result),
        "markdown": atomic_write_text(output_dir / "opinions.md", "\n".join(lines)),
        "png": _chart(individuals, groups, output_dir / "opinions.png"),
    }
    return paths


def run_opinion_eval(args: OpinionEvalArguments) -> dict:
    """Evaluate a trained persona directory; writes the report into ``args.output_dir`` and returns it."""
    steered, split, index, train, heldout = _load(args)
    random_model = _random_twin(steered, args.seed) if "random" in args.methods else None
    individual_methods = [m for m in args.methods if m in INDIVIDUAL_METHODS]
    individuals = evaluate_individuals(
        steered,
        train,
        heldout,
        individual_methods,
        args,
        cohort_of=index.get("cohort_of_user"),
        random_model=random_model,
    )
    groups = evaluate_groups(steered, split, args.methods, args, random_model=random_model, train=train)
    metrics = {}
    for method, values in individuals["methods"].items():
        metrics[f"accuracy_macro/{method}"] = values["accuracy_macro"]
    for method, values in groups["methods"].items():
        metrics[f"representativeness/{method}"] = values["mean"]
    result = {
        "schema": RESULT_SCHEMA,
        "run_name": args.run_name,
        "metrics": metrics,
        "individuals": individuals,
        "groups": groups,
        "config": asdict(args),
        "data": {k: split.get(k) for k in ("waves", "source", "num_users")},
    }
    paths = write_opinion_report(result, args.output_dir)
    logger.info("opinion report written: %s", {k: str(v) for k, v in paths.items()})
    return result
