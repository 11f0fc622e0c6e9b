"""Interval estimates shared by the evaluations: percentile bootstrap over units (prompts, questions)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "interval", "paired_bootstrap_ci", "perplexity_ci"]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over independent units ``values`` (NaNs dropped).

    Returns ``(nan, nan)`` when fewer than two units remain.
    """
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size < 2:
        return float("nan"), float("nan")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    # resamples in blocks, so that memory stays ~8 MB whatever the number of units
    block = max(1, min(n_boot, 1_000_000 // data.size))
    stats = []
    for start in range(0, n_boot, block):
        index = rng.integers(0, data.size, size=(min(block, n_boot - start), data.size))
        if statistic is np.mean:
            stats.append(data[index].mean(axis=1))
        else:
            stats.append(np.array([statistic(data[row]) for row in index]))
    stats = np.concatenate(stats)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def interval(values, *, paired_with=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean of ``values`` (or of ``values - paired_with``, paired by
    item) over its finite items with a percentile bootstrap interval (:func:`bootstrap_ci`)."""
    x = np.asarray(values, dtype=np.float64)
    if paired_with is not None:
        y = np.asarray(paired_with, dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"paired values must have one shape, got {x.shape} and {y.shape}")
        x = x - y
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    low, high = bootstrap_ci(x, n_boot=n_boot, level=level, seed=seed)
    return {"mean": float(x.mean()), "low": low, "high": high, "n": int(x.size)}


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean difference ``mean(a - b)`` over paired units with its percentile bootstrap interval."""
    diff = interval(a, paired_with=b, n_boot=n_boot, level=level, seed=seed)
    return diff["mean"], diff["low"], diff["high"]


def perplexity_ci(
    nll: Sequence[float] | np.ndarray,
    tokens: Sequence[float] | np.ndarray,
    *,
    against: tuple | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled perplexity ``exp(sum nll / sum tokens)`` over texts (each text's
    summed NLL and token count, as :func:`steer.eval.metrics.text_nll` returns them), or of its ratio to the
    ``against`` texts' ``(nll, tokens)``, resampled together (paired). ``(nan, nan)`` below two texts."""
    nll, tokens = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if nll.size < 2 or tokens.sum() == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, nll.size, size=(n_boot, nll.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.exp(nll[index].sum(1) / tokens[index].sum(1))
        if against is not None:
            other_nll, other_tokens = (np.asarray(x, dtype=np.float64) for x in against)
            values = values / np.exp(other_nll[index].sum(1) / other_tokens[index].sum(1))
    values = values[np.isfinite(values)]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)
