"""The group protocol of the opinion evaluation: representativeness toward each group of an attribute (and
every folded-in group) on the scored questions of a split, against the real Pew distributions; the persona
ablations, baselines, paired contrasts, group specificity, separation, direction agreement and the cohorts
(the paper's cluster personas, :mod:`steer.eval.opinion_cohorts`) scored like groups. :mod:`steer.eval.opinions`
describes the protocol."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from steer.errors import UserInputError
from steer.eval.opinion_baselines import (
    REFERENCE_BASELINES,
    group_demographic_preambles,
    group_few_shot_preambles,
    reference_outputs,
    shuffled_groups,
    train_twins,
    zero_persona,
)
from steer.eval.opinion_cohorts import evaluate_cohorts
from steer.eval.opinion_metrics import direction_agreement, group_separation, representativeness
from steer.eval.stats import interval
from steer.persona.text_baseline import TEXT_BASELINES, fit_text_baselines

if TYPE_CHECKING:
    from steer.eval.opinions import OpinionEvalArguments

logger = logging.getLogger(__name__)

__all__ = [
    "CONTRASTS",
    "GROUP_METHODS",
    "ScoredGroups",
    "eval_question_keys",
    "evaluate_cohorts",
    "evaluate_groups",
]

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


def _interval(values, args: OpinionEvalArguments, paired_with=None) -> dict:
    return interval(values, paired_with=paired_with, n_boot=args.n_bootstrap, seed=args.seed)


# --------------------------------------------------------------------------------------------------
# The scored groups and questions
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoredGroups:
    """The groups and questions a split scores, with the groups' real distributions."""

    attribute: str
    table: Any  # steer.persona.groups.GroupTable of the attribute and the folded-in groups' attributes
    keys: list[str]  # the scored questions
    train_keys: set[str]
    groups: list[str]  # the groups of ``attribute`` that have a persona
    fold_in: list[str]  # the folded-in groups that have a persona
    scored: list[str]  # ``groups`` and the folded-in groups of the table
    questions: dict  # key -> Question, for ``keys``
    real: dict  # (group, key) -> the real distribution (or None), for every group of the table
    same_attribute: dict[str, list[str]]  # scored group -> the other groups of its attribute

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(g, k) for g in self.scored for k in self.keys]

    def rep(self, p, g: str, k: str) -> float:
        """Representativeness of ``p`` toward group ``g``'s real distribution on the scored question ``k``."""
        q = self.real[(g, k)]
        if p is None or q is None:
            return math.nan
        return representativeness(p / p.sum(), q, self.questions[k].scaled)

    def rep_any(self, p, g: str, k: str) -> float:
        """:meth:`rep` on any question of the table (the text baselines' validation choice)."""
        q = self.table.distribution(g, k)
        if p is None or q is None:
            return math.nan
        return representativeness(p / p.sum(), q, self.table.questions[k].scaled)


def scored_groups(steered, split: dict, args: OpinionEvalArguments) -> ScoredGroups:
    """The groups of ``args.group_attribute`` and the folded-in groups, and the questions of ``args.split``
    (refused when training used one of them; at most ``args.max_questions``, seeded)."""
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
    groups = [g for g in table.names if g.startswith(f"{attribute}=") and g in steered.personas]
    if not groups:
        raise ValueError(
            f"the persona directory stores no {attribute} personas (known: {sorted(steered.personas)[:8]})"
        )
    scored = groups + [g for g in fold_in if g in table.names]
    if not keys:
        raise ValueError("no scored question has real group distributions")
    return ScoredGroups(
        attribute=attribute,
        table=table,
        keys=keys,
        train_keys=train_keys,
        groups=groups,
        fold_in=fold_in,
        scored=scored,
        questions={k: table.questions[k] for k in keys},
        real={(g, k): table.distribution(g, k) for g in table.names for k in keys},
        same_attribute={
            g: [h for h in table.names if parse_group_name(h)[0] == parse_group_name(g)[0] and h != g]
            for g in scored
        },
    )


# --------------------------------------------------------------------------------------------------
# Outputs of the methods: {method: {(group, key): distribution}}
# --------------------------------------------------------------------------------------------------


def _option_probs(steered, setup: ScoredGroups, method, rows, persona, preambles, args) -> dict:
    probs = steered.option_probs_batch(
        [setup.questions[k] for _, k in rows],
        persona,
        preambles=preambles,
        batch_size=args.batch_size,
        desc=f"groups / {method}",
    )
    logger.info("groups / %s: %d prompts", method, len(rows))
    return {row: p.numpy().astype(np.float64) for row, p in zip(rows, probs)}


def _lm_outputs(steered, setup: ScoredGroups, split: dict, methods, args: OpinionEvalArguments) -> dict:
    """The language-model methods: ``steered`` also for the peers of every scored group (their outputs give
    its wrong-group ablation); ``raw`` and ``zero`` prompted once per question."""
    pairs, keys = setup.pairs, setup.keys
    peers = [
        h
        for g in setup.scored
        for h in setup.same_attribute[g]
        if h in steered.personas and h not in setup.scored
    ]
    steer_pairs = pairs + [(h, k) for h in dict.fromkeys(peers) for k in keys]
    shared = {"raw": None, "zero": zero_persona(steered)}
    outputs: dict[str, dict] = {}
    for method in methods:
        if method in shared:
            once = _option_probs(steered, setup, method, [("*", k) for k in keys], shared[method], None, args)
            outputs[method] = {(g, k): once[("*", k)] for g, k in pairs}
        elif method == "steered":
            outputs[method] = _option_probs(
                steered, setup, method, steer_pairs, [g for g, _ in steer_pairs], None, args
            )
        elif method == "shuffled":
            pool = [g for g in split.get("train_groups", []) if g in steered.personas] or [
                g for g in steered.personas if "=" in g and g not in setup.fold_in
            ]
            others = shuffled_groups([g for g, _ in pairs], pool, args.seed)
            outputs[method] = _option_probs(steered, setup, method, pairs, others, None, args)
        elif method == "demographic":
            preambles = group_demographic_preambles([g for g, _ in pairs])
            outputs[method] = _option_probs(steered, setup, method, pairs, None, preambles, args)
        elif method == "few_shot":
            shot_keys = sorted(setup.train_keys & set(setup.table.probs))
            preambles = group_few_shot_preambles(
                setup.table, pairs, setup.scored, keys, shot_keys, args.few_shot_k, args.seed
            )
            outputs[method] = _option_probs(steered, setup, method, pairs, None, preambles, args)
    return outputs


def _text_baseline_outputs(setup: ScoredGroups, split: dict, methods) -> tuple[dict, dict]:
    """The text baselines (no language model), fitted on the training questions and chosen on the validation
    questions; returns their outputs and the records of their chosen settings."""
    wanted = [m for m in methods if m in TEXT_BASELINES]
    if not wanted:
        return {}, {}
    table = setup.table
    valid_keys = [k for k in split.get("valid_question_keys") or [] if k in table.probs]
    fold_keys = {g: split.get("fold_in", {}).get(g, {}).get("question_keys") for g in setup.scored}
    fitted = fit_text_baselines(
        table,
        sorted(setup.train_keys & set(table.probs)),
        valid_keys,
        setup.scored,
        setup.rep_any,
        group_keys={g: v for g, v in fold_keys.items() if v},
    )
    outputs, records = {}, {}
    for name in wanted:
        baseline, records[name] = fitted[name]
        outputs[name] = {(g, k): baseline.predict(g, k) for g, k in setup.pairs}
        logger.info("groups / %s: %d predictions (no LLM)", name, len(setup.pairs))
    return outputs, records


# --------------------------------------------------------------------------------------------------
# Scores and their summaries
# --------------------------------------------------------------------------------------------------


def _scores(outputs: dict, setup: ScoredGroups) -> dict[str, dict[str, np.ndarray]]:
    """Per method and scored group, the representativeness on each scored question; ``wrong_group``: this
    group's real distribution scored against the outputs steered by its peers."""
    keys = setup.keys
    scores = {
        method: {g: np.asarray([setup.rep(out.get((g, k)), g, k) for k in keys]) for g in setup.scored}
        for method, out in outputs.items()
    }
    if "steered" in outputs:
        steered = outputs["steered"]
        scores["wrong_group"] = {}
        for g in setup.scored:
            others = [h for h in setup.same_attribute[g] if (h, keys[0]) in steered]
            if others:
                rows = [[setup.rep(steered[(h, k)], g, k) for h in others] for k in keys]
                scores["wrong_group"][g] = np.nanmean(np.asarray(rows), 1)
    return scores


def _specificity(scores: dict, setup: ScoredGroups, args: OpinionEvalArguments) -> tuple[dict, dict]:
    """Own persona minus the peers' personas, on this group's real distribution (exactly 0 for a persona-blind
    model), and the real data's value 1 - mean_h rep(real_h, real_g)."""
    specificity, real_specificity = {}, {}
    for g in setup.scored:
        others = setup.same_attribute[g]
        if not others:
            continue
        with np.errstate(all="ignore"):
            real_other = np.asarray(
                [np.nanmean([setup.rep(setup.real[(h, k)], g, k) for h in others]) for k in setup.keys]
            )
        real_specificity[g] = _interval(1.0 - real_other, args)
        if "wrong_group" in scores and g in scores["wrong_group"]:
            specificity[g] = _interval(scores["steered"][g], args, paired_with=scores["wrong_group"][g])
    return specificity, real_specificity


def _method_summaries(scores: dict, setup: ScoredGroups, args: OpinionEvalArguments) -> dict:
    """Per method scored on every group of the attribute: each group's interval and the interval of the mean
    over those groups (questions where a group is unscored left out)."""
    results: dict[str, dict] = {}
    for method, per_group in scores.items():
        if not all(g in per_group for g in setup.groups):
            continue
        stacked = np.asarray([per_group[g] for g in setup.groups])
        with np.errstate(all="ignore"):
            mean_over_groups = np.where(np.isfinite(stacked).all(0), stacked.mean(0), np.nan)
        results[method] = {
            "per_group": {g: _interval(per_group[g], args) for g in setup.scored if g in per_group},
            "mean": _interval(mean_over_groups, args),
        }
    return results


def _contrasts(scores: dict, setup: ScoredGroups, args: OpinionEvalArguments) -> dict:
    """``steered - <method>`` per group with a paired bootstrap interval, for each method of ``CONTRASTS``."""
    contrasts: dict[str, dict] = {}
    if "steered" not in scores:
        return contrasts
    for other in CONTRASTS:
        if other not in scores:
            continue
        contrasts[f"steered - {other}"] = {
            g: _interval(scores["steered"][g], args, paired_with=scores[other][g])
            for g in setup.scored
            if g in scores[other]
        }
    return contrasts


def evaluate_groups(steered, split, methods, args: OpinionEvalArguments) -> dict:
    """Representativeness toward each group of ``args.group_attribute`` and every folded-in group, on the
    scored questions of ``split``, against the real Pew distributions (see :mod:`steer.eval.opinions`)."""
    setup = scored_groups(steered, split, args)
    keys, groups = setup.keys, setup.groups
    methods = [m for m in methods if m in GROUP_METHODS]
    if "wrong_group" in methods and "steered" not in methods:
        methods = ["steered", *methods]
    outputs = _lm_outputs(steered, setup, split, methods, args)
    twins = train_twins(keys, sorted(setup.train_keys), setup.table.questions)
    for method in methods:
        if method in REFERENCE_BASELINES:
            outputs[method] = reference_outputs(method, setup.table, twins, setup.pairs)
    text_outputs, text_records = _text_baseline_outputs(setup, split, methods)
    outputs.update(text_outputs)
    scores = _scores(outputs, setup)
    specificity, real_specificity = _specificity(scores, setup, args)
    # the TV distance between the steered outputs of two groups vs between their real distributions
    separation = {}
    if "steered" in outputs and len(groups) >= 2:
        separation = group_separation(outputs["steered"], setup.real, groups, keys)
    train = sorted(setup.train_keys & set(setup.table.probs))  # for the constant-sign baseline of direction
    direction = direction_agreement(
        outputs,
        {**setup.real, **{(g, k): setup.table.distribution(g, k) for g in groups for k in train}},
        {**setup.questions, **{k: setup.table.questions[k] for k in train}},
        groups,
        keys,
        n_boot=args.n_bootstrap,
        seed=args.seed,
        train_keys=train,
    )
    cohorts = {}
    if "steered" in outputs and args.cohorts:
        by_key = {m: {k: outputs[m][(groups[0], k)] for k in keys} for m in ("raw", "zero") if m in outputs}
        cohorts = evaluate_cohorts(steered, split, keys, setup.questions, by_key, args)
    fold_in = [g for g in setup.scored if g not in groups]
    return {
        "attribute": setup.attribute,
        "groups": groups,
        "fold_in_groups": fold_in,
        "fold_in": {g: split.get("fold_in", {}).get(g, {}) for g in fold_in},
        "num_questions": len(keys),
        "question_keys": keys,
        "eval_waves": split.get(f"{args.split}_waves"),
        "split": args.split,
        "train_twins": len(twins),
        "methods": _method_summaries(scores, setup, args),
        "contrasts": _contrasts(scores, setup, args),
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
