"""The individual protocol of the opinion evaluation (Li et al. 2024): per-individual accuracy on held-out
questions, the share of a person's held-out answers whose option gets the highest probability, macro-averaged
over people with a bootstrap interval over people."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from steer.eval.opinion_baselines import (
    person_demographic_preambles,
    person_few_shot_preambles,
    population_mode_predictions,
    shuffled_people,
    zero_persona,
)
from steer.eval.opinion_metrics import macro_accuracy
from steer.eval.stats import interval

if TYPE_CHECKING:
    from steer.eval.opinions import OpinionEvalArguments

logger = logging.getLogger(__name__)

__all__ = ["INDIVIDUAL_METHODS", "evaluate_individuals"]

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


def _sample_answers(steered, heldout, args: OpinionEvalArguments) -> tuple[list[int], list[tuple], list[str]]:
    """Up to ``max_users`` people with held-out answers (and a persona vector, when the model has an embedder)
    and up to ``max_answers_per_user`` answers of each. Returns ``(chosen rows, items, known user ids)``, an
    item being ``(user id, question, answer index, heldout row)``."""
    rng = np.random.default_rng(args.seed)
    candidates = [i for i in range(heldout.num_users) if heldout.observed[i].any()]
    known: list[str] = []
    if steered.embedder is not None:
        known = list(map(str, steered.embedder.user_ids))
        candidates = [i for i in candidates if str(heldout.user_ids[i]) in set(known)]
    if not candidates:
        raise ValueError("no evaluated person has held-out answers and a persona vector")
    chosen = sorted(rng.choice(candidates, size=min(args.max_users, len(candidates)), replace=False))
    items = []
    for i in chosen:
        cols = np.nonzero(heldout.observed[i])[0]
        cols = rng.permutation(cols)[: args.max_answers_per_user]
        for j in cols:
            key = heldout.question_keys[j]
            items.append(
                (str(heldout.user_ids[i]), heldout.questions[key], int(heldout.option_index[i, j]), i)
            )
    return chosen, items, known


def _prompt_inputs(method, steered, items, known, train, heldout, args, cohort_of):
    """``(persona, preambles)`` of a language-model method for every item; ``None`` when the method is not
    defined here (a cohort baseline without a cohort table, a method of the group protocol)."""
    users = [u for u, _, _, _ in items]
    if method == "raw":
        return None, None
    if method == "steered":
        return users, None
    if method == "zero":
        return zero_persona(steered), None
    if method == "shuffled":
        return shuffled_people(users, known or users, args.seed), None
    if method == "cohort":
        if not cohort_of:
            logger.warning("cohort baseline skipped: the persona directory has no cohort table")
            return None
        return [f"cohort:{cohort_of[u]}" for u in users], None
    if method == "demographic":
        return None, person_demographic_preambles(heldout, [row for _, _, _, row in items])
    if method == "few_shot":
        return None, person_few_shot_preambles(train, users, args.few_shot_k, args.seed)
    return None


def _predictions(method, steered, items, known, train, heldout, args, cohort_of, population):
    """The predicted option index of every item under ``method`` (``None`` entries: no prediction), or
    ``None`` when the method is not evaluated."""
    if method == "population_mode":
        if population is None:
            return None
        return population_mode_predictions(population, [q.key for _, q, _, _ in items])
    inputs = _prompt_inputs(method, steered, items, known, train, heldout, args, cohort_of)
    if inputs is None:
        return None
    persona, preambles = inputs
    probs = steered.option_probs_batch(
        [q for _, q, _, _ in items],
        persona,
        preambles=preambles,
        batch_size=args.batch_size,
        desc=f"individuals / {method}",
    )
    return [int(p.argmax()) for p in probs]


def _accuracy(items, predictions, args: OpinionEvalArguments) -> dict:
    """Macro and micro accuracy over people, with the bootstrap interval of the macro accuracy."""
    correct: dict[str, list[bool]] = defaultdict(list)
    for (user, _, answer, _), prediction in zip(items, predictions):
        if prediction is not None:
            correct[user].append(prediction == answer)
    per_person = [float(np.mean(v)) for v in correct.values() if v]
    return {
        "accuracy_macro": macro_accuracy(correct),
        "accuracy_micro": float(np.mean([c for v in correct.values() for c in v]))
        if per_person
        else math.nan,
        "interval": interval(per_person, n_boot=args.n_bootstrap, seed=args.seed),
    }


def evaluate_individuals(
    steered, train, heldout, methods, args: OpinionEvalArguments, cohort_of=None, population=None
) -> dict:
    """Per-individual accuracy on held-out questions, for each method, with bootstrap intervals over people."""
    chosen, items, known = _sample_answers(steered, heldout, args)
    results: dict[str, dict] = {}
    for method in methods:
        predictions = _predictions(method, steered, items, known, train, heldout, args, cohort_of, population)
        if predictions is None:
            continue
        results[method] = _accuracy(items, predictions, args)
        logger.info("individuals / %s: %s", method, results[method])
    return {
        "num_people": len(chosen),
        "num_answers": len(items),
        "num_questions": len({q.key for _, q, _, _ in items}),
        "methods": results,
        "not_defined": {"mf": "held-out questions are unknown to the embedder"},
    }
