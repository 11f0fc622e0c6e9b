"""The cohorts of the group protocol: the paper's cluster personas (k-means over the training groups' persona
vectors) scored like groups, each against the mean real distribution of its member groups."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from steer.eval.opinion_metrics import representativeness
from steer.eval.stats import interval

if TYPE_CHECKING:
    from steer.eval.opinions import OpinionEvalArguments

__all__ = ["evaluate_cohorts"]


def _group_cohorts(steered, split: dict, table, args: OpinionEvalArguments) -> tuple[dict, dict] | None:
    """The cohort centroids ``{"cohort:<c>": vector}`` and members ``{"<c>": [group, ...]}``: those training
    stored, else k-means over the training groups' persona vectors here; ``None`` without an embedder."""
    from steer.persona.data import cluster_groups

    members = split.get("group_cohorts")
    centroids = {f"cohort:{c}": steered.personas.get(f"cohort:{c}") for c in members or {}}
    if not members or any(v is None for v in centroids.values()):
        if steered.embedder is None:
            return None
        groups = [str(u) for u in steered.embedder.user_ids]
        train = [k for k in split.get("train_question_keys", []) if k in table.probs]
        centroids, members = cluster_groups(
            steered.embedder, table.to_responses(groups, train), groups, seed=args.seed
        )
    return centroids, members


def evaluate_cohorts(
    steered, split, keys, questions, persona_blind: dict, args: OpinionEvalArguments
) -> dict:
    """The paper's cluster personas scored like groups: k-means cohorts of the training groups' persona vectors
    (stored by training as ``cohort:<c>``, else clustered here the same way), each cohort's real distribution the
    mean of its member groups' distributions; representativeness of the steered centroid, paired differences to
    the persona-blind methods in ``persona_blind`` (``{"raw": {key: p}, ...}``) and the cohort specificity (own
    centroid minus the other cohorts' centroids, on this cohort's real distribution)."""
    from steer.persona.groups import load_group_table

    ci = functools.partial(interval, n_boot=args.n_bootstrap, seed=args.seed)
    attributes = split.get("group_attributes")
    if not attributes:
        return {}
    table = load_group_table(split.get("opinionqa_dir"), split["waves"], attributes=attributes)
    found = _group_cohorts(steered, split, table, args)
    if found is None:
        return {}
    centroids, members = found
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
    probs = steered.option_probs_batch(
        [questions[k] for _, k in rows],
        torch.stack([centroids[f"cohort:{c}"].reshape(-1) for c, _ in rows]),
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
            "steered": ci(steered_c),
            "specificity": ci(steered_c, paired_with=others),
        }
        for method, by_key in persona_blind.items():
            blind = np.asarray([rep(by_key.get(k), c, k) for k in keys])
            entry[method] = ci(blind)
            entry[f"steered - {method}"] = ci(steered_c, paired_with=blind)
        result[c] = entry
    return result
