"""Synthetic survey respondents, for tests and benchmarks (the individual-level data is not public here).

Public API
----------
``simulate_respondents(waves=None, *, root=None, group_by=("POLPARTY", "RACE"), n_respondents=1000,
seed=0, observed_frac=0.15, tilt=0.5, noise=0.5, attributes=GROUP_ATTRIBUTES, separation=0.0, ...)
-> Responses``
    Multi-attribute respondents grounded in the real Pew tables of OpinionQA's ``*_data.json`` files.

    *Who.* Each person's ``group_by`` cell (one attribute or a pair) is drawn from the real joint
    population shares (the pair tables where they exist); ``SEX`` is drawn from the real
    ``POLPARTY_SEX`` table given the person's party when there is one, and every other attribute of
    ``attributes`` from its real population shares (independently: the release has no other joint tables).

    *What they answer.* A person's answer to question ``j`` is the ``U``-quantile of their cell's real
    answer distribution (smoothed toward the population by ``smoothing`` pseudo-counts; ordinal order),
    where ``U`` is the rank, among the cell's respondents to ``j``, of a latent score::

        score_ij = Σ_a d(a, value_i(a), j) / sd_j  +  tilt · η_i · c_j  +  noise · ε_ij

    ``d(a, v, j)`` is the real deviation of group ``a=v``'s mean scaled answer from the population's on
    question ``j`` (so a person's *other* real attributes move them the way those groups really differ
    on that question), ``c_j`` the question's real liberal-conservative direction (the "Very
    conservative" minus "Very liberal" mean, standardised over questions), ``η_i ~ N(0, 1)`` the person's
    own lean, ``ε_ij ~ N(0, 1)``. Because answers are quantiles of ranks within the cell, every cell's
    answer distribution is the real one whatever ``tilt`` and ``noise`` are (up to rounding), so
    ``group_by`` marginals match Pew; the other attributes' marginals move in the real direction but
    are not calibrated. Nominal questions (no order) are drawn independently from the cell's distribution.
    ``separation > 0`` plants extra, well separated group structure by tilting each cell's distribution
    along the ordinal scale (the "easy planted" setting of the tests; it departs from Pew on purpose).
    Each person answers a random subset of ``observed_frac`` of the questions (OpinionQA's sparsity),
    refusing at the cell's real refusal rate when ``refusals=True``. The output is the same
    ``Responses`` as ``load_responses``, and ``Responses.to_csv`` writes the real ``responses.csv`` format.

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

from steer.persona.groups import GROUP_ATTRIBUTES
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


def _draw(rng: np.random.Generator, shares: dict, size: int) -> np.ndarray:
    values = list(shares)
    p = np.asarray([shares[v] for v in values], dtype=np.float64)
    return np.asarray(values, dtype=object)[rng.choice(len(values), size=size, p=p / p.sum())]


def _extra_attributes(
    rng, directories, attrs, extra, cells, exclude
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Values of the non-``group_by`` attributes per person, and each attribute's distributions."""
    values, tables = {}, {}
    first = directories[0]
    questions = load_wave(first)
    for attribute in extra:
        dists = {}
        for directory in directories:
            try:
                dists.update(group_distributions(directory, attribute, questions=load_wave(directory)))
            except FileNotFoundError:
                continue
        if not dists:
            continue
        tables[attribute] = dists
        if attribute == "SEX" and "POLPARTY" in attrs:
            try:
                joint = group_distributions(first, ("POLPARTY", "SEX"), questions=questions)
            except FileNotFoundError:
                joint = None
            if joint is not None:
                shares = group_shares(joint, exclude=exclude)
                party = cells[:, attrs.index("POLPARTY")]
                out = np.empty(len(party), dtype=object)
                for value in np.unique(party):
                    conditional = {s: v for (p, s), v in shares.items() if p == value}
                    if conditional:
                        rows = np.nonzero(party == value)[0]
                        out[rows] = _draw(rng, conditional, len(rows))
                missing = np.asarray([v is None for v in out])
                if missing.any():
                    marginal = {g[0]: v for g, v in group_shares(dists, exclude=exclude).items()}
                    out[missing] = _draw(rng, marginal, int(missing.sum()))
                values[attribute] = out
                continue
        marginal = {g[0]: v for g, v in group_shares(dists, exclude=exclude).items()}
        values[attribute] = _draw(rng, marginal, len(cells))
    return values, tables


def _mean_deviation(dist: GroupDistribution) -> dict[str, float]:
    """Each group's mean scaled answer minus the population's (ordinal questions only)."""
    scaled = dist.question.scaled_array().astype(np.float64)
    population = dist.population()
    base = float(population @ scaled)
    out = {}
    for g, group in enumerate(dist.groups):
        probs = dist.probs[g]
        if not np.isnan(probs).any():
            out[group[0]] = float(probs @ scaled) - base
    return out


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
    noise: float = 0.5,
    attributes: Sequence[str] = GROUP_ATTRIBUTES,
    separation: float = 0.0,
    refusals: bool = True,
    smoothing: float = 5.0,
    exclude_groups: Iterable[str] = ("Refused", "nan"),
    questions: Sequence[str] | None = None,
) -> Responses:
    """Synthetic respondents drawn from the real Pew group tables (see the module docstring).

    ``questions`` restricts to those keys; ``smoothing`` is the pseudo-count pulling each cell's
    distribution toward the population (small cells have few real respondents).
    """
    if n_respondents < 1:
        raise ValueError(f"n_respondents must be >= 1, got {n_respondents}")
    attrs = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    if not 1 <= len(attrs) <= 2:
        raise ValueError(f"group_by must be one attribute or a pair, got {attrs}")
    if tilt < 0 or noise < 0 or separation < 0:
        raise ValueError(f"tilt, noise and separation must be >= 0, got {tilt}, {noise}, {separation}")
    exclude = set(exclude_groups)
    rng = np.random.default_rng(seed)

    directories = wave_dirs(root, waves)
    all_questions: dict[str, Question] = {}
    dists: dict[str, GroupDistribution] = {}
    joint: dict[str, GroupDistribution] = {}
    for directory in directories:
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
    group_of = rng.choice(len(groups), size=n_respondents, p=share / share.sum())
    cells = np.asarray([groups[g] for g in group_of], dtype=object).reshape(n_respondents, len(attrs))
    extra = [a for a in attributes if a not in attrs]
    extra_values, extra_tables = _extra_attributes(rng, directories, attrs, extra, cells, exclude)
    extra_codes = {
        a: np.unique(np.asarray(v, dtype=str), return_inverse=True) for a, v in extra_values.items()
    }
    lean = rng.normal(size=n_respondents)
    mask = _observed_mask(rng, n_respondents, len(keys), observed_frac, min_answers)

    # the real liberal-conservative direction of every question, standardised over questions
    ideology = extra_tables.get("POLIDEOLOGY", {})
    direction = np.zeros(len(keys))
    for j, key in enumerate(keys):
        if key in ideology and not all_questions[key].is_nominal:
            deviation = _mean_deviation(ideology[key])
            direction[j] = deviation.get("Very conservative", 0.0) - deviation.get("Very liberal", 0.0)
    if direction.std() > 0:
        direction = direction / direction.std()
    planted_cells = rng.normal(size=(len(groups), 2)) / np.sqrt(2)
    planted_questions = rng.normal(size=(len(keys), 2))

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
        if separation > 0 and not question.is_nominal:
            scale = question.scaled_array().astype(np.float64) - 0.5
            logits = np.log(np.clip(probs, 1e-12, None))
            logits += (
                _TILT_GAIN * separation * (planted_cells @ planted_questions[j])[:, None] * scale[None, :]
            )
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
        users = np.nonzero(mask[:, j])[0]
        if len(users) == 0:
            continue
        refused = (
            rng.random(len(users)) < refuse[group_of[users]]
            if question.refusals
            else np.zeros(len(users), bool)
        )
        answering = users[~refused]
        choice = np.zeros(len(answering), dtype=np.int64)
        if question.is_nominal:
            choice = _sample_rows(rng, probs[group_of[answering]])
        else:
            attribute_score = np.zeros(len(answering))
            for attribute, table in extra_tables.items():
                if key in table:
                    deviation = _mean_deviation(table[key])
                    levels, codes = extra_codes[attribute]
                    table_values = np.asarray([deviation.get(v, 0.0) for v in levels])
                    attribute_score += table_values[codes[answering]]
            if attribute_score.std() > 0:
                attribute_score /= attribute_score.std()
            score = attribute_score + tilt * lean[answering] * direction[j]
            score = score + noise * rng.normal(size=len(answering))
            for g in np.unique(group_of[answering]):
                members = np.nonzero(group_of[answering] == g)[0]
                ranks = np.argsort(np.argsort(score[members], kind="stable"), kind="stable")
                quantile = (ranks + rng.random(len(members))) / len(members)
                cumulative = np.cumsum(probs[g])
                choice[members] = np.minimum(
                    np.searchsorted(cumulative, quantile * cumulative[-1]), n_opt - 1
                )
        option_index[answering, j] = choice
        if not question.is_nominal:
            values[answering, j] = question.scaled_array()[choice]
        if refused.any():
            refusal_counts = dist.counts[:, n_opt:].sum(0)
            refusal_p = refusal_counts / refusal_counts.sum() if refusal_counts.sum() > 0 else None
            refusal_index[users[refused], j] = rng.choice(
                len(question.refusals), size=int(refused.sum()), p=refusal_p
            )

    demographics = {attr: [groups[g][a] for g in group_of] for a, attr in enumerate(attrs)}
    for attribute, column in extra_values.items():
        demographics[attribute] = list(column)
    return Responses(
        user_ids=np.array([str(100000 + i) for i in range(n_respondents)]),
        demographics=pd.DataFrame(demographics),
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
