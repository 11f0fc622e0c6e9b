"""Synthetic survey respondents, for tests and benchmarks (the individual-level data is not public here).

Public API
----------
``simulate_respondents(waves=None, *, root=None, group_by=("POLPARTY", "RACE"), n_respondents=1000,
seed=0, observed_frac=0.15, tilt=0.5, separation=0.0, ...) -> Responses``
    Respondents grounded in the real Pew group distributions of OpinionQA's ``*_data.json`` files:
    each person's group is drawn from the real joint population shares of ``group_by`` (one attribute
    or a pair), and each answer from that group's real answer distribution for the question, smoothed
    toward the population and exponentially tilted along the ordinal scale by a personal latent
    vector::

        P(option k | person i, question j) ∝ P(k | group(i), j) · exp(<z_i, a_j> · (s_jk - 1/2) · 4)
        z_i = separation · c_group(i) + tilt · ε_i,   a_j, c_g, ε_i ~ N(0, I / latent_dim)

    (``s_jk`` the scaled ordinal; nominal questions are not tilted). ``tilt`` makes people within one
    group differ; ``separation > 0`` plants extra, well separated group structure (the "easy
    planted" setting of the tests: ``separation=3, tilt=0.3``). Each person answers a random subset
    of ``observed_frac`` of the questions (OpinionQA's sparsity), refusing at the group's real refusal
    rate when ``refusals=True``. The output is the same ``Responses`` as ``load_responses`` and
    ``Responses.to_csv`` writes the real ``responses.csv`` format.

    Pairs without a joint file in a wave (POLPARTY_RACE exists for waves 26-36 only) combine the two
    single-attribute distributions as ``P(k|a) P(k|b) / P(k)`` (a conditional-independence
    approximation, logged).
``synthetic_responses(n_users, n_questions, *, dim=8, n_groups=4, n_options=4, observed_frac=0.15,
seed=0, ...) -> Responses``
    Purely synthetic planted low-rank data at any scale (for benchmarks): people belong to one of
    ``n_groups`` (column ``GROUP``), ``u_i = c_group + spread · ε_i``, and the answer is the
    ``n_options``-level quantisation of ``sigmoid(<u_i, q_j> + b_j + noise)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from steer.persona.opinionqa import (
    GroupDistribution,
    Question,
    Responses,
    group_distributions,
    group_shares,
    load_wave,
    wave_dirs,
)

logger = logging.getLogger(__name__)

_TILT_GAIN = 4.0  # a unit <z, a> moves the log-odds of the two scale ends apart by 4


def _observed_mask(rng: np.random.Generator, n: int, q: int, frac: float, min_answers: int) -> np.ndarray:
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"observed_frac must be in (0, 1], got {frac}")
    mask = rng.random((n, q), dtype=np.float32) < frac
    min_answers = min(min_answers, q)
    short = np.nonzero(mask.sum(1) < min_answers)[0]
    for i in short:  # rare: only users below the floor
        extra = rng.permutation(q)[:min_answers]
        mask[i, extra] = True
    return mask


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` (rows sum to 1)."""
    cumulative = np.cumsum(probs, axis=1)
    draws = rng.random((len(probs), 1)) * cumulative[:, -1:]
    return np.minimum((draws > cumulative).sum(1), probs.shape[1] - 1)


def _combine_pair(
    first: GroupDistribution, second: GroupDistribution, population: np.ndarray
) -> GroupDistribution:
    """Approximate joint-group counts from two single-attribute distributions."""
    question = first.question
    n_opt = question.num_options
    groups, rows = [], []
    pop = np.clip(population, 1e-6, None)
    for i, (a,) in enumerate(first.groups):
        for j, (b,) in enumerate(second.groups):
            pa, pb = first.probs[i], second.probs[j]
            if np.isnan(pa).any() or np.isnan(pb).any():
                continue
            joint = pa * pb / pop
            joint = joint / joint.sum()
            size = min(first.sizes[i], second.sizes[j])
            refusal = 0.5 * (first.refusal_rate[i] + second.refusal_rate[j])
            row = np.zeros(len(question.all_options))
            row[:n_opt] = joint * size * (1 - refusal)
            if question.refusals:
                row[n_opt] = size * refusal
            groups.append((a, b))
            rows.append(row)
    counts = np.stack(rows) if rows else np.zeros((0, len(question.all_options)))
    return GroupDistribution(
        question=question, attributes=first.attributes + second.attributes, groups=groups, counts=counts
    )


def _wave_distributions(directory, attrs: tuple[str, ...], questions: dict[str, Question]):
    """(distributions, is_joint) for one wave; pairs fall back to the independence combination."""
    try:
        return group_distributions(directory, attrs, questions=questions), True
    except FileNotFoundError:
        if len(attrs) != 2:
            raise
    first = group_distributions(directory, attrs[0], questions=questions)
    second = group_distributions(directory, attrs[1], questions=questions)
    combined = {}
    for key in first.keys() & second.keys():
        population = first[key].population()
        if np.isnan(population).any():
            continue
        combined[key] = _combine_pair(first[key], second[key], population)
    logger.info("%s: no %s joint file, combined the single-attribute files", directory, "_".join(attrs))
    return combined, False


def simulate_respondents(
    waves: Iterable[int | str] | None = None,
    *,
    root: str | os.PathLike | None = None,
    group_by: str | Sequence[str] = ("POLPARTY", "RACE"),
    n_respondents: int = 1000,
    seed: int = 0,
    observed_frac: float = 0.15,
    min_answers: int = 1,
    tilt: float = 0.5,
    separation: float = 0.0,
    latent_dim: int = 2,
    refusals: bool = True,
    smoothing: float = 5.0,
    exclude_groups: Iterable[str] = ("Refused", "nan"),
    questions: Sequence[str] | None = None,
) -> Responses:
    """Synthetic respondents drawn from the real Pew group distributions (see the module docstring).

    ``questions`` restricts to those keys; ``smoothing`` is the pseudo-count pulling each group's
    distribution toward the population (small groups have few real respondents).
    """
    if n_respondents < 1:
        raise ValueError(f"n_respondents must be >= 1, got {n_respondents}")
    attrs = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    if not 1 <= len(attrs) <= 2:
        raise ValueError(f"group_by must be one attribute or a pair, got {attrs}")
    exclude = set(exclude_groups)
    rng = np.random.default_rng(seed)

    all_questions: dict[str, Question] = {}
    dists: dict[str, GroupDistribution] = {}
    joint: dict[str, GroupDistribution] = {}
    for directory in wave_dirs(root, waves):
        wave_questions = load_wave(directory)
        all_questions.update(wave_questions)
        wave_dists, is_joint = _wave_distributions(directory, attrs, wave_questions)
        dists.update(wave_dists)
        if is_joint:
            joint.update(wave_dists)
    keys = [k for k in all_questions if k in dists]
    if questions is not None:
        unknown = [k for k in questions if k not in dists]
        if unknown:
            raise KeyError(f"no group distributions for questions {unknown[:5]} (group_by={attrs})")
        keys = list(questions)
    if not keys:
        raise ValueError(f"no questions with {attrs} group counts in the selected waves")

    shares = group_shares(joint or dists, exclude=exclude)
    groups = list(shares)
    share = np.array([shares[g] for g in groups])
    share = share / share.sum()
    group_of = rng.choice(len(groups), size=n_respondents, p=share)

    centers = rng.normal(size=(len(groups), latent_dim)) / np.sqrt(latent_dim)
    personal = rng.normal(size=(n_respondents, latent_dim)) / np.sqrt(latent_dim)
    z = separation * centers[group_of] + tilt * personal
    loadings = rng.normal(size=(len(keys), latent_dim))
    mask = _observed_mask(rng, n_respondents, len(keys), observed_frac, min_answers)

    option_index = np.full((n_respondents, len(keys)), -1, dtype=np.int16)
    values = np.full((n_respondents, len(keys)), np.nan, dtype=np.float32)
    refusal_index = np.full((n_respondents, len(keys)), -1, dtype=np.int8)
    for j, key in enumerate(keys):
        dist = dists[key]
        question = dist.question
        n_opt = question.num_options
        population = dist.population()
        if np.isnan(population).any():
            population = np.full(n_opt, 1.0 / n_opt)
        # per simulated group: smoothed answer distribution and refusal rate
        probs = np.tile(population, (len(groups), 1))
        refuse = np.zeros(len(groups))
        row_of = {g: r for r, g in enumerate(dist.groups)}
        for g, group in enumerate(groups):
            r = row_of.get(group)
            if r is None:
                continue
            answered = dist.counts[r, :n_opt]
            if answered.sum() + smoothing > 0:  # an empty real group keeps the population distribution
                probs[g] = (answered + smoothing * population) / (answered.sum() + smoothing)
            if refusals and dist.sizes[r] > 0:
                refuse[g] = dist.counts[r, n_opt:].sum() / dist.sizes[r]
        users = np.nonzero(mask[:, j])[0]
        if len(users) == 0:
            continue
        logits = np.log(np.clip(probs[group_of[users]], 1e-12, None))
        if not question.is_nominal:
            scale = question.scaled_array().astype(np.float64) - 0.5
            logits = logits + _TILT_GAIN * (z[users] @ loadings[j])[:, None] * scale[None, :]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        choice = _sample_rows(rng, p)
        refused = (
            rng.random(len(users)) < refuse[group_of[users]]
            if question.refusals
            else np.zeros(len(users), bool)
        )
        option_index[users[~refused], j] = choice[~refused]
        if not question.is_nominal:
            values[users[~refused], j] = question.scaled_array()[choice[~refused]]
        if refused.any():
            refusal_counts = dist.counts[:, n_opt:].sum(0)
            refusal_p = refusal_counts / refusal_counts.sum() if refusal_counts.sum() > 0 else None
            refusal_index[users[refused], j] = rng.choice(
                len(question.refusals), size=int(refused.sum()), p=refusal_p
            )

    demographics = pd.DataFrame({attr: [groups[g][a] for g in group_of] for a, attr in enumerate(attrs)})
    return Responses(
        user_ids=np.array([str(100000 + i) for i in range(n_respondents)]),
        demographics=demographics,
        question_keys=keys,
        questions={k: all_questions[k] for k in keys},
        option_index=option_index,
        values=values,
        weights=np.ones(n_respondents),
        refusal_index=refusal_index,
        stats={"refusals": int((refusal_index >= 0).sum())},
    )


def synthetic_questions(n_questions: int, n_options: int = 4, wave: str = "W0") -> dict[str, Question]:
    """``n_questions`` generic ordinal questions ``Q<j>_<wave>`` with options ``Option 1..n`` + Refused."""
    references = [f"Option {k + 1}" for k in range(n_options)] + ["Refused"]
    return {
        f"Q{j}_{wave}": Question.from_lists(
            f"Q{j}_{wave}", f"Synthetic question {j}?", references, range(1, n_options + 1)
        )
        for j in range(n_questions)
    }


def synthetic_responses(
    n_users: int,
    n_questions: int,
    *,
    dim: int = 8,
    n_groups: int = 4,
    n_options: int = 4,
    observed_frac: float = 0.15,
    spread: float = 0.5,
    noise: float = 0.3,
    seed: int = 0,
    min_answers: int = 1,
) -> Responses:
    """Planted low-rank responses at any scale (see the module docstring); groups in column ``GROUP``."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, size=n_users)
    centers = rng.normal(size=(n_groups, dim))
    users = (centers[groups] + spread * rng.normal(size=(n_users, dim))).astype(np.float32)
    items = (rng.normal(size=(n_questions, dim)) / np.sqrt(dim)).astype(np.float32)
    bias = rng.normal(scale=0.5, size=n_questions).astype(np.float32)
    mask = _observed_mask(rng, n_users, n_questions, observed_frac, min_answers)
    option_index = np.full((n_users, n_questions), -1, dtype=np.int16)
    values = np.full((n_users, n_questions), np.nan, dtype=np.float32)
    for start in range(0, n_users, 4096):  # row blocks keep the memory bounded at any scale
        block = slice(start, min(n_users, start + 4096))
        noisy = noise * rng.standard_normal((block.stop - block.start, n_questions), dtype=np.float32)
        latent = users[block] @ items.T + bias + noisy
        level = np.minimum((n_options / (1.0 + np.exp(-latent))).astype(np.int16), n_options - 1)
        observed = mask[block]
        option_index[block] = np.where(observed, level, -1)
        values[block] = np.where(observed, level / np.float32(n_options - 1), np.nan)
    questions = synthetic_questions(n_questions, n_options)
    return Responses(
        user_ids=np.array([str(i) for i in range(n_users)]),
        demographics=pd.DataFrame({"GROUP": np.array([f"G{g}" for g in groups], dtype=object)}),
        question_keys=list(questions),
        questions=questions,
        option_index=option_index,
        values=values,
        weights=np.ones(n_users),
    )
