"""2-D views of persona embeddings (PNG, matplotlib's Agg backend; no display needed).

``project_2d(embeddings) -> np.ndarray [N, 2]``: PCA projection (centred SVD).
``plot_embeddings(embeddings, path, *, cohorts=None, party=None, centroids=None, title=None,
max_points=20000, seed=0) -> Path``: one scatter panel per colouring given (cohort labels, party
labels), cohort centroids marked with crosses; written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from steer.io import atomic_write


def _array(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def project_2d(embeddings: torch.Tensor | np.ndarray, *, return_basis: bool = False):
    """PCA to two dimensions; with ``return_basis`` also (mean, components [2, d]) to project more points."""
    points = _array(embeddings).astype(np.float64)
    if points.ndim != 2 or len(points) < 2:
        raise ValueError(f"need at least two [N, d] embeddings, got shape {points.shape}")
    mean = points.mean(0)
    _, _, vt = np.linalg.svd(points - mean, full_matrices=False)
    components = vt[:2]
    if components.shape[0] < 2:  # d == 1: pad with a zero axis
        components = np.vstack([components, np.zeros_like(components)])
    projected = (points - mean) @ components.T
    return (projected, mean, components) if return_basis else projected


def plot_embeddings(
    embeddings: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    *,
    cohorts: Sequence[int] | np.ndarray | None = None,
    party: Sequence[str] | np.ndarray | None = None,
    centroids: torch.Tensor | np.ndarray | None = None,
    title: str | None = None,
    max_points: int = 20000,
    seed: int = 0,
) -> Path:
    """Scatter the PCA projection coloured by cohort and/or by party into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    projected, mean, components = project_2d(embeddings, return_basis=True)
    n = len(projected)
    panels = [
        (name, np.asarray(values))
        for name, values in (("cohort", cohorts), ("party", party))
        if values is not None
    ]
    for name, values in panels:
        if len(values) != n:
            raise ValueError(f"plot_embeddings: {len(values)} {name} labels for {n} embeddings")
    if not panels:
        panels = [("embedding", np.zeros(n, dtype=np.int64))]
    keep = np.arange(n)
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    for axis, (name, values) in zip(axes[0], panels):
        labels = np.asarray([str(v) for v in values[keep]])
        for label in sorted(set(labels)):
            members = labels == label
            axis.scatter(
                projected[keep][members, 0], projected[keep][members, 1], s=6, alpha=0.6, label=label
            )
        if name == "cohort" and centroids is not None:
            marks = (_array(centroids).astype(np.float64) - mean) @ components.T
            axis.scatter(marks[:, 0], marks[:, 1], marker="x", c="black", s=80, label="centroid")
        axis.set_title(f"coloured by {name}")
        axis.set_xlabel("PC 1")
        axis.set_ylabel("PC 2")
        if len(set(labels)) <= 20:
            axis.legend(fontsize=7, markerscale=2, loc="best")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(figure)
