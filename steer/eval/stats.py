"""Interval estimates shared by the evaluations: percentile bootstrap over units (prompts, questions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_bootstrap_ci"]


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


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean difference ``mean(a - b)`` over paired units with its percentile bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have one shape, got {a.shape} and {b.shape}")
    diff = a - b
    diff = diff[np.isfinite(diff)]
    low, high = bootstrap_ci(diff, n_boot=n_boot, level=level, seed=seed)
    return (float(diff.mean()) if diff.size else float("nan")), low, high
