"""Baselines that read the question text, without a language model.

A persona-steered LM is worth its cost only if it beats what the question's words alone predict about a
group. Both baselines embed a question as TF-IDF of its text and of its first and last option (fitted on
the training questions only) and predict, per group, a distribution over the question's options from that
group's answers to the training questions with the same number of options:

* ``text_ridge``: ridge regression of the population's distribution plus a second ridge of the group's
  deviation from it (group - population), each with its own strength;
* ``text_knn``: the similarity-weighted mean of the group's distributions on the ``k`` most similar
  training questions.

Their settings (ridge strengths, ``k``) are chosen on the validation questions (:func:`fit_text_baselines`),
never on the scored ones. A folded-in group is fitted on the answers it was folded in from only.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["TEXT_BASELINES", "TextBaseline", "TextFeatures", "fit_text_baselines", "question_document"]

TEXT_BASELINES = ("text_ridge", "text_knn")
RIDGE_GRID = (0.3, 1.0, 3.0, 10.0)
KNN_GRID = (5, 10, 20, 40)
_FLOOR = 1e-3


def question_document(question) -> str:
    """The text a baseline reads: the question, its first and its last option."""
    options = list(question.options)
    return " ".join([question.text, options[0], options[-1]]) if options else question.text


def _normalise(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _FLOOR, None)
    return p / p.sum()


class TextFeatures:
    """TF-IDF of the training questions' documents (:func:`question_document`), fitted on them only; the vectors
    of other questions are computed once each."""

    def __init__(self, table, train_keys: Sequence[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.table = table
        self.train_keys = [k for k in train_keys if k in table.questions]
        if not self.train_keys:
            raise ValueError("a text baseline needs training questions")
        self.vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1)
        self.matrix = self.vectorizer.fit_transform(
            [question_document(table.questions[k]) for k in self.train_keys]
        )
        self.row = {k: i for i, k in enumerate(self.train_keys)}
        self._vectors: dict[str, object] = {}

    def vector(self, key: str):
        if key not in self._vectors:
            self._vectors[key] = self.vectorizer.transform([question_document(self.table.questions[key])])
        return self._vectors[key]


@dataclass
class TextBaseline:
    """One text baseline fitted on ``train_keys`` of a group table (see the module docstring).

    ``kind`` is ``"ridge"`` (``params``: ``alpha_population``, ``alpha_deviation``) or ``"knn"`` (``k``).
    ``group_keys`` restricts a group's training questions (a folded-in group's own answers).
    """

    table: object
    train_keys: Sequence[str]
    kind: str = "ridge"
    params: dict = field(default_factory=dict)
    group_keys: dict[str, Sequence[str]] = field(default_factory=dict)
    features: TextFeatures | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("ridge", "knn"):
            raise ValueError(f"TextBaseline.kind must be 'ridge' or 'knn', got {self.kind!r}")
        if self.features is None:
            self.features = TextFeatures(self.table, self.train_keys)
        self.train_keys = self.features.train_keys
        self._row = self.features.row
        self._models: dict[tuple, object] = {}

    def _vector(self, key: str):
        return self.features.vector(key)

    def _train(self, group: str, n_options: int) -> tuple[list[str], np.ndarray]:
        keys = self.group_keys.get(group, self.train_keys)
        chosen, targets = [], []
        for k in keys:
            if k not in self._row or self.table.questions[k].num_options != n_options:
                continue
            dist = self.table.distribution(group, k)
            if dist is not None:
                chosen.append(k)
                targets.append(dist)
        return chosen, np.asarray(targets, dtype=np.float64).reshape(len(chosen), n_options)

    def _ridge(self, keys: list[str], targets: np.ndarray, alpha: float):
        from sklearn.linear_model import Ridge

        rows = [self._row[k] for k in keys]
        return Ridge(alpha=alpha).fit(self.features.matrix[rows], targets)

    def predict(self, group: str, key: str) -> np.ndarray | None:
        """The group's predicted distribution over ``key``'s options (``None``: no training question with as
        many options)."""
        n = self.table.questions[key].num_options
        keys, targets = self._train(group, n)
        if not keys:
            return None
        x = self._vector(key)
        if self.kind == "knn":
            rows = [self._row[k] for k in keys]
            similarity = (self.features.matrix[rows] @ x.T).toarray().ravel()
            top = np.argsort(-similarity)[: int(self.params.get("k", 10))]
            weights = similarity[top] + 1e-6
            return _normalise((weights[:, None] * targets[top]).sum(0) / weights.sum())
        population = np.asarray([self.table.population[k] for k in keys], dtype=np.float64)
        cache = (group, n)
        if cache not in self._models:
            self._models[cache] = (
                self._ridge(keys, population, float(self.params.get("alpha_population", 1.0))),
                self._ridge(keys, targets - population, float(self.params.get("alpha_deviation", 1.0))),
            )
        base, deviation = self._models[cache]
        return _normalise(base.predict(x)[0] + deviation.predict(x)[0])


def _mean_score(baseline: TextBaseline, groups: Sequence[str], keys: Sequence[str], score: Callable) -> float:
    values = []
    for g in groups:
        for k in keys:
            p = baseline.predict(g, k)
            value = score(p, g, k) if p is not None else np.nan
            if np.isfinite(value):
                values.append(value)
    return float(np.mean(values)) if values else float("nan")


def fit_text_baselines(
    table,
    train_keys: Sequence[str],
    valid_keys: Sequence[str],
    groups: Sequence[str],
    score: Callable[[np.ndarray, str, str], float],
    *,
    group_keys: dict[str, Sequence[str]] | None = None,
) -> dict[str, tuple[TextBaseline, dict]]:
    """``{name: (fitted baseline, record)}`` for ``text_ridge`` and ``text_knn``, each with the setting of its
    grid that scores best (``score(p, group, key)``, higher is better) on ``valid_keys`` over ``groups``.
    ``record``: the chosen setting and every setting's validation score."""
    group_keys = dict(group_keys or {})
    grids = {
        "text_ridge": (
            "ridge",
            [
                {"alpha_population": a, "alpha_deviation": d}
                for a, d in itertools.product(RIDGE_GRID, RIDGE_GRID)
                if d >= a
            ],
        ),
        "text_knn": ("knn", [{"k": k} for k in KNN_GRID]),
    }
    features = TextFeatures(table, train_keys)
    fitted = {}
    for name, (kind, grid) in grids.items():
        scored = []
        for params in grid:
            baseline = TextBaseline(
                table, train_keys, kind=kind, params=params, group_keys=group_keys, features=features
            )
            value = _mean_score(baseline, groups, valid_keys, score) if valid_keys else float("nan")
            scored.append((value, params, baseline))
        finite = [s for s in scored if np.isfinite(s[0])]
        best = max(finite, key=lambda s: s[0]) if finite else scored[0]
        record = {
            "chosen": best[1],
            "valid_score": best[0],
            "grid": [{"params": p, "valid_score": v} for v, p, _ in scored],
            "chosen_on": "validation questions" if finite else "no validation questions: first setting",
        }
        logger.info(
            "%s: chose %s on the validation questions (mean representativeness %.4f)", name, best[1], best[0]
        )
        fitted[name] = (best[2], record)
    return fitted
