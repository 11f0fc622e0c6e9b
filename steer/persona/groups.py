"""Demographic groups as collaborative-filtering "respondents" (the real per-group Pew distributions).

The individual-level ``responses.csv`` files of OpinionQA are not public everywhere, but the real,
survey-weighted answer distributions of every demographic group are (``<ATTR>_data.json``). Here each
group (``"POLPARTY=Democrat"``, ``"AGE=18-29"``, ``"EDUCATION=Postgraduate"``, ...) is one respondent
whose "answer" to a question is its whole answer distribution: its expected scaled ordinal feeds the
matrix factorisation (:class:`~steer.persona.embedder.PersonaEmbedder`, groups x questions), and the
distribution itself is the target of the soft-prompt network's distribution-level loss.

Public API
----------
``GROUP_ATTRIBUTES``: the attributes with a ``<ATTR>_data.json`` file in every wave.
``group_name(attribute, value) -> "ATTR=value"`` and ``parse_group_name(name) -> (attribute, value)``.
``GroupTable``: ``names`` [G], ``question_keys`` [Q], ``questions``, ``probs[key]`` [G, n_options]
    (NaN rows where a group has no answers), ``sizes[key]`` [G] (weighted respondents),
    ``population[key]`` [n_options] (all groups of one attribute summed: the whole population).
    ``select(names=None, keys=None)``, ``distribution(name, key)``, ``means()`` [G, Q] (expected
    scaled ordinal), ``to_responses(names=None, keys=None)`` (a ``Responses`` whose users are groups,
    column ``GROUP`` = name, one column per attribute), ``wave_of(key)``.
``load_group_table(root=None, waves=None, attributes=GROUP_ATTRIBUTES, exclude=("Refused", "nan"),
    ordinal_only=True) -> GroupTable``: every question of ``waves`` with group counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from steer.persona.opinionqa import Question, Responses, group_distributions, load_wave, wave_dirs

GROUP_ATTRIBUTES: tuple[str, ...] = (
    "AGE",
    "CREGION",
    "EDUCATION",
    "INCOME",
    "POLIDEOLOGY",
    "POLPARTY",
    "RACE",
    "SEX",
)
EXCLUDED_VALUES: tuple[str, ...] = ("Refused", "nan", "")


def group_name(attribute: str, value: str) -> str:
    """``"POLPARTY=Democrat"``."""
    return f"{attribute}={value}"


def parse_group_name(name: str) -> tuple[str, str]:
    """``"POLPARTY=Democrat"`` -> ``("POLPARTY", "Democrat")``."""
    attribute, sep, value = str(name).partition("=")
    if not sep or not attribute or not value:
        raise ValueError(f"group name {name!r} is not of the form 'ATTRIBUTE=value'")
    return attribute, value


@dataclass
class GroupTable:
    """Real answer distributions of demographic groups on survey questions (see the module docstring)."""

    names: list[str]
    question_keys: list[str]
    questions: dict[str, Question]
    probs: dict[str, np.ndarray]  # key -> [G, n_options], NaN rows where unknown
    sizes: dict[str, np.ndarray]  # key -> [G]
    population: dict[str, np.ndarray]  # key -> [n_options]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError("GroupTable: duplicate group names")
        for key in self.question_keys:
            if key not in self.questions or key not in self.probs:
                raise ValueError(f"GroupTable: no question or distributions for {key}")
            shape = self.probs[key].shape
            if shape != (len(self.names), self.questions[key].num_options):
                raise ValueError(f"GroupTable: probs[{key}] has shape {shape}")

    @property
    def num_groups(self) -> int:
        return len(self.names)

    @property
    def attributes(self) -> list[str]:
        return list(dict.fromkeys(parse_group_name(n)[0] for n in self.names))

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown group {name!r} (known: {', '.join(self.names[:8])}, ...)") from None

    def wave_of(self, key: str) -> str | None:
        return self.questions[key].wave

    def distribution(self, name: str, key: str) -> np.ndarray | None:
        """The group's real answer distribution on ``key`` (``None`` when it has no answers there)."""
        row = self.probs[key][self.index(name)]
        return None if np.isnan(row).any() else row

    def select(self, names: Sequence[str] | None = None, keys: Sequence[str] | None = None) -> GroupTable:
        names = list(self.names if names is None else names)
        keys = list(self.question_keys if keys is None else keys)
        rows = [self.index(n) for n in names]
        unknown = [k for k in keys if k not in self.probs]
        if unknown:
            raise KeyError(f"GroupTable.select: unknown question keys {unknown[:5]}")
        return GroupTable(
            names=names,
            question_keys=keys,
            questions={k: self.questions[k] for k in keys},
            probs={k: self.probs[k][rows] for k in keys},
            sizes={k: self.sizes[k][rows] for k in keys},
            population={k: self.population[k] for k in keys},
        )

    def means(self) -> np.ndarray:
        """Expected scaled ordinal per group and question [G, Q] (NaN where unknown or nominal)."""
        out = np.full((self.num_groups, len(self.question_keys)), np.nan, dtype=np.float32)
        for j, key in enumerate(self.question_keys):
            question = self.questions[key]
            if question.is_nominal:
                continue
            out[:, j] = self.probs[key] @ question.scaled_array().astype(np.float64)
        return out

    def to_responses(
        self, names: Sequence[str] | None = None, keys: Sequence[str] | None = None
    ) -> Responses:
        """Groups as respondents: ``values`` = expected scaled ordinal, ``option_index`` = modal option."""
        table = self if names is None and keys is None else self.select(names, keys)
        values = table.means()
        option_index = np.full(values.shape, -1, dtype=np.int16)
        for j, key in enumerate(table.question_keys):
            probs = table.probs[key]
            known = ~np.isnan(probs).any(1)
            option_index[known, j] = probs[known].argmax(1)
        parsed = [parse_group_name(n) for n in table.names]
        demographics = {"GROUP": [n for n in table.names]}
        for attribute in dict.fromkeys(a for a, _ in parsed):
            demographics[attribute] = [v if a == attribute else np.nan for a, v in parsed]
        return Responses(
            user_ids=np.asarray(table.names, dtype=object).astype(str),
            demographics=pd.DataFrame(demographics, dtype=object),
            question_keys=list(table.question_keys),
            questions=dict(table.questions),
            option_index=option_index,
            values=values,
            weights=np.ones(table.num_groups),
        )


def load_group_table(
    root: str | os.PathLike | None = None,
    waves: Iterable[int | str] | None = None,
    *,
    attributes: Sequence[str] = GROUP_ATTRIBUTES,
    exclude: Iterable[str] = EXCLUDED_VALUES,
    ordinal_only: bool = True,
) -> GroupTable:
    """The groups of ``attributes`` and their real answer distributions on every question of ``waves``.

    A question enters when every attribute's file has it; ``ordinal_only`` drops nominal questions.
    The population distribution is the sum over the groups of the first attribute (all respondents,
    refusals of the attribute included), which equals ``NONE_data.json`` where that file exists.
    """
    exclude = set(exclude)
    attributes = list(attributes)
    if not attributes:
        raise ValueError("load_group_table: no attributes")
    names: list[str] = []
    rows: dict[str, dict[str, np.ndarray]] = {}
    sizes: dict[str, dict[str, float]] = {}
    population: dict[str, np.ndarray] = {}
    questions: dict[str, Question] = {}
    keys: list[str] = []
    for directory in wave_dirs(root, waves):
        wave_questions = load_wave(directory)
        per_attribute = {a: group_distributions(directory, a, questions=wave_questions) for a in attributes}
        common = [k for k in wave_questions if all(k in per_attribute[a] for a in attributes)]
        for key in common:
            question = wave_questions[key]
            if ordinal_only and question.is_nominal:
                continue
            questions[key] = question
            keys.append(key)
            rows[key], sizes[key] = {}, {}
            first = per_attribute[attributes[0]][key]
            population[key] = first.population()
            for attribute in attributes:
                dist = per_attribute[attribute][key]
                probs = dist.probs
                for g, group in enumerate(dist.groups):
                    value = group[0]
                    if value in exclude:
                        continue
                    name = group_name(attribute, value)
                    if name not in names:
                        names.append(name)
                    rows[key][name] = probs[g]
                    sizes[key][name] = float(dist.sizes[g])
    if not keys:
        raise ValueError(f"no questions with group counts for {attributes} in the selected waves")
    names = sorted(names, key=lambda n: (attributes.index(parse_group_name(n)[0]), n))
    probs_out, sizes_out = {}, {}
    for key in keys:
        n_opt = questions[key].num_options
        probs_out[key] = np.stack([rows[key].get(n, np.full(n_opt, np.nan)) for n in names])
        sizes_out[key] = np.asarray([sizes[key].get(n, 0.0) for n in names])
    return GroupTable(names, keys, questions, probs_out, sizes_out, population)
