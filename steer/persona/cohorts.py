"""Cohorts of persona embeddings (k-means) and demographic centroids.

Public API
----------
``find_cohorts(embeddings, k=None, k_range=range(2, 11), *, embedder=None, responses=None, seed=0,
n_init=4) -> CohortResult``
    scikit-learn k-means (``n_init`` restarts, seeded). With ``k=None`` each k of ``k_range`` is
    scored by the paper's criterion, the matrix-factorisation loss (MSE on the observed answers of
    ``responses``) when every person is replaced by their cohort centroid, and the elbow of that
    curve is chosen (the point farthest below the chord joining the curve's ends, on the
    min-max normalised curve). Without ``embedder``/``responses`` the k-means inertia is used instead.
``CohortResult``: ``labels`` [U] int, ``centroids`` [k, d] tensor, ``k``, ``k_values``, ``losses``,
    ``inertias``, ``criterion``; ``sizes``, ``to_dict``/``from_dict``, ``save``/``load`` (json).
``group_centroids(embeddings, attribute_values, *, weights=None, min_count=1, exclude=("nan", "")) ->
dict[str, Tensor]``: the (weighted) mean embedding per demographic value, e.g. the persona of
    "Democrat" from ``responses.group_labels("POLPARTY")``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from steer.io import atomic_write_text
from steer.persona.opinionqa import Responses
from steer.progress import progress_bar

logger = logging.getLogger(__name__)


def _as_numpy(embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
    array = (
        embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    )
    if array.ndim != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("embeddings contain NaN or inf")
    return array.astype(np.float32)


@dataclass
class CohortResult:
    """k-means cohorts and the elbow curve they were chosen from."""

    labels: np.ndarray
    centroids: torch.Tensor
    k: int
    k_values: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    inertias: list[float] = field(default_factory=list)
    criterion: str = "mf_loss"

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "labels": self.labels.tolist(),
            "centroids": self.centroids.tolist(),
            "k_values": list(self.k_values),
            "losses": list(self.losses),
            "inertias": list(self.inertias),
            "criterion": self.criterion,
        }

    @classmethod
    def from_dict(cls, payload: dict) -> CohortResult:
        missing = [key for key in ("k", "labels", "centroids") if key not in payload]
        if missing:
            raise ValueError(f"cohort table lacks fields {missing}")
        return cls(
            labels=np.asarray(payload["labels"], dtype=np.int64),
            centroids=torch.tensor(payload["centroids"], dtype=torch.float32),
            k=int(payload["k"]),
            k_values=list(payload.get("k_values", [])),
            losses=list(payload.get("losses", [])),
            inertias=list(payload.get("inertias", [])),
            criterion=payload.get("criterion", "mf_loss"),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cohort table as json (atomically)."""
        return atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CohortResult:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cohort table not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err


def elbow(k_values: Sequence[int], losses: Sequence[float]) -> int:
    """The k farthest below the chord of the min-max normalised (decreasing) loss curve."""
    if len(k_values) != len(losses) or not k_values:
        raise ValueError("elbow: k_values and losses must be non-empty and of equal length")
    if len(k_values) < 3:
        return int(k_values[int(np.argmin(losses))])
    x = np.asarray(k_values, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    x = (x - x[0]) / (x[-1] - x[0])
    span = y.max() - y.min()
    if span <= 0:
        return int(k_values[0])
    y = (y - y.min()) / span
    chord = y[0] + (y[-1] - y[0]) * x
    return int(k_values[int(np.argmax(chord - y))])


def _kmeans(points: np.ndarray, k: int, seed: int, n_init: int) -> KMeans:
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(points)


def find_cohorts(
    embeddings: torch.Tensor | np.ndarray,
    k: int | None = None,
    k_range: Iterable[int] = range(2, 11),
    *,
    embedder=None,
    responses: Responses | None = None,
    seed: int = 0,
    n_init: int = 4,
    disable_tqdm: bool | None = None,
) -> CohortResult:
    """k-means cohorts of ``embeddings`` [U, d]; ``k=None`` picks k by the elbow (module docstring).

    The search over k shows a progress bar unless ``disable_tqdm`` (default:
    :func:`steer.progress.progress_disabled`).
    """
    points = _as_numpy(embeddings)
    if (embedder is None) != (responses is None):
        raise ValueError(
            "find_cohorts: pass both embedder and responses (for the MF-loss criterion) or neither"
        )
    if responses is not None and responses.num_users != len(points):
        raise ValueError(f"find_cohorts: {responses.num_users} respondents but {len(points)} embeddings")
    candidates = [int(k)] if k is not None else sorted({int(v) for v in k_range})
    if not candidates or min(candidates) < 1:
        raise ValueError(f"k values must be >= 1, got {candidates}")
    if max(candidates) > len(points):
        raise ValueError(f"k={max(candidates)} exceeds the number of embeddings ({len(points)})")
    criterion = "mf_loss" if embedder is not None else "inertia"
    models, losses, inertias = [], [], []
    bar = progress_bar(candidates, desc="cohort search (k-means over k)", unit="k", disable=disable_tqdm)
    for value in bar:
        bar.set_postfix(k=value, refresh=False)
        model = _kmeans(points, value, seed, n_init)
        models.append(model)
        inertias.append(float(model.inertia_))
        if embedder is not None:
            centroids = torch.as_tensor(model.cluster_centers_[model.labels_], dtype=torch.float32)
            losses.append(embedder.evaluate(responses, centroids) ** 2)
        else:
            losses.append(float(model.inertia_))
    chosen = candidates[0] if k is not None else elbow(candidates, losses)
    model = models[candidates.index(chosen)]
    if k is None:
        logger.info("cohorts: k=%d chosen by the elbow of the %s curve %s", chosen, criterion, losses)
    return CohortResult(
        labels=model.labels_.astype(np.int64),
        centroids=torch.as_tensor(model.cluster_centers_, dtype=torch.float32),
        k=chosen,
        k_values=candidates,
        losses=losses,
        inertias=inertias,
        criterion=criterion,
    )


def group_centroids(
    embeddings: torch.Tensor | np.ndarray,
    attribute_values: Sequence[object] | np.ndarray,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    min_count: int = 1,
    exclude: Iterable[str] = ("nan", ""),
) -> dict[str, torch.Tensor]:
    """Mean (optionally survey-weighted) embedding per attribute value, sorted by value.

    Missing values (None/NaN) and ``exclude`` labels are skipped; groups with fewer than
    ``min_count`` people are dropped.
    """
    points = _as_numpy(embeddings)
    values = np.asarray(attribute_values, dtype=object)
    if len(values) != len(points):
        raise ValueError(f"group_centroids: {len(values)} attribute values for {len(points)} embeddings")
    w = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(points) or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("group_centroids: weights must be finite, non-negative and one per embedding")
    exclude = set(exclude)
    labels = np.array(
        ["nan" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]
    )
    out: dict[str, torch.Tensor] = {}
    for label in sorted(set(labels) - exclude):
        members = labels == label
        if members.sum() < min_count or w[members].sum() <= 0:
            continue
        centroid = (points[members] * w[members, None]).sum(0) / w[members].sum()
        out[label] = torch.as_tensor(centroid, dtype=torch.float32)
    return out
