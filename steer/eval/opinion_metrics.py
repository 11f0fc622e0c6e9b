"""Metrics of the opinion evaluation: ordinal Wasserstein distance, representativeness, per-person accuracy,
the separation of two groups' answers and the direction agreement of their differences.

``representativeness`` follows Santurkar et al. 2023: ``1 - WD(p_model, p_human) / (max - min)`` over the
question's ordinal scale. The intervals come from :func:`steer.eval.stats.interval`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from steer.eval.stats import interval

__all__ = [
    "DIRECTION_METHODS",
    "DIRECTION_MIN_GAP",
    "direction_agreement",
    "expected_answer",
    "group_separation",
    "macro_accuracy",
    "ordinal_wasserstein",
    "representativeness",
]

# the real difference of two groups' expected answers a question needs for its direction to count
DIRECTION_MIN_GAP = 0.05
# methods whose outputs can differ between groups (a persona-blind method never gets a direction right)
DIRECTION_METHODS = ("steered", "demographic", "few_shot", "text_ridge", "text_knn", "group_train_frequency")


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


def expected_answer(p: np.ndarray, scale) -> float:
    """The expected scaled ordinal answer of the distribution ``p`` (normalised) over ``scale``."""
    p = np.asarray(p, dtype=np.float64)
    return float(np.dot(p / p.sum(), np.asarray(scale, dtype=np.float64)))


def group_separation(steered: dict, real: dict, groups: Sequence[str], keys: Sequence[str]) -> dict:
    """Per pair of groups ``"g vs h"``: the mean total-variation distance between their ``steered`` outputs
    (``{(group, key): p}``) and between their ``real`` distributions, over the questions ``keys``."""
    separation = {}
    for i, g in enumerate(groups):
        for h in groups[i + 1 :]:
            model_tv = [0.5 * np.abs(steered[(g, k)] - steered[(h, k)]).sum() for k in keys]
            real_tv = [
                0.5 * np.abs(real[(g, k)] - real[(h, k)]).sum()
                for k in keys
                if real[(g, k)] is not None and real[(h, k)] is not None
            ]
            separation[f"{g} vs {h}"] = {
                "model_tv": float(np.mean(model_tv)),
                "real_tv": float(np.mean(real_tv)),
            }
    return separation


def _direction_of_method(
    out: dict, g: str, h: str, gaps: dict, counted: list, questions, n_boot, seed
) -> dict:
    """One method's sign agreement on the ``counted`` questions and Pearson's r over all of ``gaps``."""
    model = {}
    for k in gaps:
        a, b = out.get((g, k)), out.get((h, k))
        if a is not None and b is not None:
            model[k] = expected_answer(a, questions[k].scaled) - expected_answer(b, questions[k].scaled)
    right = [float(np.sign(model[k]) == np.sign(gaps[k])) for k in counted if k in model]
    shared = [k for k in gaps if k in model]
    r = math.nan
    if len(shared) > 2:
        x = np.asarray([model[k] for k in shared])
        y = np.asarray([gaps[k] for k in shared])
        if x.std() > 0 and y.std() > 0:
            r = float(np.corrcoef(x, y)[0, 1])
    return {"sign_right": interval(np.asarray(right), n_boot=n_boot, seed=seed), "pearson_r": r}


def _constant_sign(real: dict, questions, g: str, h: str, train_keys: Sequence[str]) -> float | None:
    """The majority sign of ``g - h`` over the training questions with a real gap >= ``DIRECTION_MIN_GAP``."""
    signs = []
    for k in train_keys:
        a, b = real.get((g, k)), real.get((h, k))
        if a is None or b is None or k not in questions:
            continue
        gap = expected_answer(a, questions[k].scaled) - expected_answer(b, questions[k].scaled)
        if abs(gap) >= DIRECTION_MIN_GAP:
            signs.append(np.sign(gap))
    if not signs:
        return None
    return 1.0 if np.mean(signs) > 0 else -1.0


def direction_agreement(
    outputs: dict,
    real: dict,
    questions,
    groups: Sequence[str],
    keys: Sequence[str],
    *,
    n_boot: int,
    seed: int,
    train_keys: Sequence[str] = (),
) -> dict:
    """Per pair of groups ``g - h``: on the questions where their real expected scaled answers differ by at
    least ``DIRECTION_MIN_GAP``, the share where a method's ``g - h`` difference has the real sign (a tie counts
    as wrong), with a bootstrap interval over those questions; and Pearson's r of the two differences over all
    scored questions. ``outputs``: ``{method: {(group, key): p}}``; ``real``: ``{(group, key): p or None}``.

    With ``train_keys`` (whose real distributions are in ``real`` too) a method ``constant`` is added: the same
    sign on every question, the majority sign of ``g - h`` over the training questions with a gap of at least
    ``DIRECTION_MIN_GAP``. It reads no question: a sign share at its level is the base rate, not knowledge
    (its r is undefined)."""
    result = {}
    for i, g in enumerate(groups):
        for h in groups[i + 1 :]:
            gaps = {
                k: expected_answer(real[(g, k)], questions[k].scaled)
                - expected_answer(real[(h, k)], questions[k].scaled)
                for k in keys
                if real.get((g, k)) is not None and real.get((h, k)) is not None
            }
            counted = [k for k, v in gaps.items() if abs(v) >= DIRECTION_MIN_GAP]
            methods = {}
            for method in DIRECTION_METHODS:
                out = outputs.get(method)
                if out:
                    methods[method] = _direction_of_method(out, g, h, gaps, counted, questions, n_boot, seed)
            constant = _constant_sign(real, questions, g, h, train_keys)
            if constant is not None:
                right = [float(constant == np.sign(gaps[k])) for k in counted]
                methods["constant"] = {
                    "sign_right": interval(np.asarray(right), n_boot=n_boot, seed=seed),
                    "pearson_r": math.nan,
                    "sign": constant,
                }
            result[f"{g} - {h}"] = {
                "questions": len(counted),
                "min_gap": DIRECTION_MIN_GAP,
                "methods": methods,
            }
    return result
