"""Toxicity oracles: ``NonToxic`` = P(text is not toxic).

Backends:
- ``"profanity"`` (default, offline): ``alt-profanity-check``'s linear SVM, satisfaction = 1 - p_profane.
"""

from __future__ import annotations

import logging

import numpy as np

from .base import Constraint

logger = logging.getLogger(__name__)

BACKENDS = ("profanity",)


class NonToxic(Constraint):
    """C(x) = P(x is not toxic) from a toxicity classifier, batched."""

    def __init__(self, backend: str = "profanity", *, batch_size: int = 4096, max_chars: int = 20_000) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown NonToxic backend {backend!r}; available: {', '.join(BACKENDS)}")
        self.backend = backend
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.name = f"non_toxic[{backend}]"

    def toxicity(self, texts: list[str]) -> np.ndarray:
        """Raw toxicity probability per text (the complement of the satisfaction score)."""
        from profanity_check import predict_prob

        texts = [t[: self.max_chars] for t in texts]
        out = [predict_prob(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def score(self, texts: list[str]) -> np.ndarray:
        return 1.0 - self.toxicity(texts)
