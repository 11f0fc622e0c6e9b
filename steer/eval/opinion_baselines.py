"""Baselines and ablations of the opinion evaluation (what ``steered`` is compared with).

* prompts for the language model: ``demographic`` (the person / group described in words) and ``few_shot``
  (the person's own answers / the group's most common answers to training questions);
* persona ablations: ``zero`` (the zero vector) and ``shuffled`` (another person's / group's persona);
* predictions without a language model: ``population``, ``majority``, ``uniform``, ``train_frequency`` and
  ``group_train_frequency`` (the distributions of the same question in a training wave, where it repeats),
  and, for individuals, ``population_mode``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "ATTRIBUTE_WORDS",
    "REFERENCE_BASELINES",
    "demographic_preamble",
    "few_shot_preamble",
    "group_demographic_preambles",
    "group_few_shot_preamble",
    "group_few_shot_preambles",
    "person_demographic_preambles",
    "person_few_shot_preambles",
    "population_mode_predictions",
    "question_stem",
    "reference_outputs",
    "shuffled_groups",
    "shuffled_people",
    "train_twins",
    "traits",
    "zero_persona",
]

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
REFERENCE_BASELINES = ("population", "majority", "uniform", "train_frequency", "group_train_frequency")


# --------------------------------------------------------------------------------------------------
# Prompts
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


def group_few_shot_preamble(examples: Sequence[tuple[str, str]]) -> str:
    """K of a group's most common answers (the context few-shot baseline for groups)."""
    lines = ["Here are the most common answers of people in your group to other survey questions:"]
    for question, answer in examples:
        lines.append(f"Q: {question.strip()}\nA: {answer}")
    lines.append("Answer the next question the way people in your group would.")
    return "\n".join(lines)


def traits(row, columns: Sequence[str]) -> dict[str, str]:
    """The answered demographic ``columns`` of a respondent's ``row`` (missing values and refusals left out)."""
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


def person_demographic_preambles(responses, rows: Sequence[int]) -> list[str]:
    """The demographic prompt of the respondent in each of ``rows`` of ``responses``, from the demographic
    columns that any respondent answered."""
    demographics = responses.demographics
    columns = [c for c in demographics.columns if demographics[c].notna().any()]
    return [demographic_preamble(traits(demographics.iloc[row].to_dict(), columns)) for row in rows]


def person_few_shot_preambles(train, users: Sequence[str], k: int, seed: int) -> list[str | None]:
    """For each of ``users``, ``k`` of the person's own answers in ``train`` (seeded per person); ``None`` for
    a person without training answers."""
    train_row = {str(u): i for i, u in enumerate(train.user_ids)}
    preambles = []
    for user in users:
        row = train_row.get(user)
        shots = []
        if row is not None:
            cols = np.nonzero(train.observed[row])[0]
            for j in np.random.default_rng([seed, row]).permutation(cols)[:k]:
                q = train.questions[train.question_keys[j]]
                shots.append((q.text, q.options[int(train.option_index[row, j])]))
        preambles.append(few_shot_preamble(shots) if shots else None)
    return preambles


def group_demographic_preambles(groups: Sequence[str]) -> list[str]:
    """The demographic prompt of each group name (``"POLPARTY=Democrat"``)."""
    from steer.persona.groups import parse_group_name

    return [demographic_preamble({parse_group_name(g)[0]: parse_group_name(g)[1]}) for g in groups]


def group_few_shot_preambles(
    table, pairs: Sequence[tuple[str, str]], scored: list[str], keys: list[str], shot_keys, k: int, seed: int
) -> list[str | None]:
    """For each (group, question) of ``pairs``, the group's modal answers to ``k`` of the training questions
    ``shot_keys`` (seeded per group and question); ``None`` where the group answered none of them."""
    preambles = []
    for g, key in pairs:
        rng = np.random.default_rng([seed, scored.index(g), keys.index(key)])
        shots = []
        for shot in rng.permutation(shot_keys) if shot_keys else []:
            dist = table.distribution(g, shot)
            if dist is not None:
                shots.append((table.questions[shot].text, table.questions[shot].options[int(dist.argmax())]))
            if len(shots) >= k:
                break
        preambles.append(group_few_shot_preamble(shots) if shots else None)
    return preambles


# --------------------------------------------------------------------------------------------------
# Persona ablations
# --------------------------------------------------------------------------------------------------


def zero_persona(steered) -> torch.Tensor:
    """The zero vector (the average training persona after standardisation)."""
    return torch.zeros(1, steered.network.config.persona_dim)


def shuffled_people(users: Sequence[str], pool: Sequence[str], seed: int) -> list[str]:
    """For each of ``users``, another person drawn from ``pool`` (seeded)."""
    pool = np.asarray(pool, dtype=object)
    draws = np.random.default_rng([seed, 1]).integers(0, len(pool), size=len(users))
    return [
        str(pool[d]) if str(pool[d]) != u else str(pool[(d + 1) % len(pool)]) for d, u in zip(draws, users)
    ]


def shuffled_groups(groups: Sequence[str], pool: Sequence[str], seed: int) -> list[str]:
    """For each of ``groups``, another group drawn from ``pool`` (seeded)."""
    rng = np.random.default_rng([seed, 2])
    others = []
    for g in groups:
        candidates = [p for p in pool if p != g]
        others.append(candidates[int(rng.integers(len(candidates)))])
    return others


# --------------------------------------------------------------------------------------------------
# Predictions without a language model
# --------------------------------------------------------------------------------------------------


def question_stem(key: str) -> str:
    """``"GUNACTIVITYA_W26"`` -> ``"GUNACTIVITYA"`` (the question without its wave)."""
    return re.sub(r"_W\d+$", "", key)


def train_twins(eval_keys, train_keys, questions) -> dict[str, str]:
    """Evaluation question -> a training question with the same stem and options (questions that repeat)."""
    by_stem: dict[str, str] = {}
    for key in train_keys:
        if key in questions:
            by_stem.setdefault(question_stem(key), key)
    twins = {}
    for key in eval_keys:
        twin = by_stem.get(question_stem(key))
        if twin is not None and questions[twin].options == questions[key].options:
            twins[key] = twin
    return twins


def reference_outputs(method: str, table, twins: dict[str, str], pairs: Sequence[tuple[str, str]]) -> dict:
    """``{(group, key): p or None}``: the prediction of the reference baseline ``method`` (one of
    ``REFERENCE_BASELINES``) from the real ``table``; ``twins`` from :func:`train_twins`."""
    population = table.population

    def predict(g: str, k: str):
        if method == "population":
            return population[k]
        if method == "majority":
            return np.eye(len(population[k]))[int(np.argmax(population[k]))]
        if method == "uniform":
            return np.full(table.questions[k].num_options, 1.0 / table.questions[k].num_options)
        if method == "train_frequency":
            return population[twins[k]] if k in twins else None
        if method == "group_train_frequency":
            return table.distribution(g, twins[k]) if k in twins else None
        raise ValueError(f"unknown reference baseline {method!r}; choose from {list(REFERENCE_BASELINES)}")

    return {(g, k): predict(g, k) for g, k in pairs}


def population_mode_predictions(population: dict, keys: Sequence[str]) -> list[int | None]:
    """The population's most common answer to each of ``keys`` (``None`` where the population is unknown)."""
    return [int(np.argmax(population[k])) if k in population else None for k in keys]
