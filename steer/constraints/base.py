"""The constraint interface: a sequence-level oracle ``texts -> P(constraint satisfied)``.

Backends may fail on some inputs (NaN, None, values outside [0, 1]). Such scores are never passed
on: :meth:`Constraint.evaluate` masks them (``valid=False``), counts them in ``stats`` and logs a
warning; ``__call__`` returns the probabilities with masked entries set to ``invalid_fill``.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class ConstraintScores:
    """Probabilities that each text satisfies a constraint, and which of them are trustworthy."""

    probs: torch.Tensor  # float32 [N], invalid entries hold ``fill``
    valid: torch.Tensor  # bool [N]

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())

    def hard(self, threshold: float = 0.5) -> torch.Tensor:
        """Binary labels: 1.0 where ``probs >= threshold``."""
        return hard_labels(self.probs, threshold)


def hard_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary satisfaction labels (float 0/1) from probabilities."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return (probs >= threshold).float()


def soft_labels(probs: torch.Tensor) -> torch.Tensor:
    """Soft labels are the probabilities themselves, clamped to [0, 1]."""
    return probs.float().clamp(0.0, 1.0)


def sanitize_scores(raw: Sequence[float | None] | torch.Tensor, fill: float = 0.0) -> ConstraintScores:
    """Turn raw backend outputs into :class:`ConstraintScores`, masking NaN/None/out-of-range."""
    values = []
    valid = []
    for value in raw.tolist() if isinstance(raw, torch.Tensor) else raw:
        ok = value is not None and isinstance(value, (int, float)) and not math.isnan(float(value))
        ok = ok and 0.0 <= float(value) <= 1.0
        valid.append(ok)
        values.append(float(value) if ok else fill)
    return ConstraintScores(
        probs=torch.tensor(values, dtype=torch.float32), valid=torch.tensor(valid, dtype=torch.bool)
    )


class Constraint(ABC):
    """A sequence-level constraint C(x): callable ``texts -> torch.Tensor`` of P(satisfied) in [0, 1].

    Subclasses implement :meth:`score` (raw backend values, possibly NaN/None). Callers that must
    drop failed texts use :meth:`evaluate`; ``__call__`` is the plain tensor view.
    """

    name: str = "constraint"
    invalid_fill: float = 0.0  # what __call__ reports for a text the backend could not score
    # What a token's own text tells about the whole sequence, for the guidance priors
    # (steer.guidance.oracle_priors): "violation" (a token whose text fails makes the sequence fail: toxicity,
    # ban lists; flags and the context prior apply), "satisfaction" (a token whose text satisfies settles the
    # constraint, the others say nothing: topic lists) or "none" (single tokens say nothing).
    token_evidence: str = "violation"

    def __init__(self) -> None:
        self.stats = {"scored": 0, "invalid": 0}

    @property
    def monotone(self) -> bool:
        """Whether a prefix that satisfies the constraint settles it: every continuation of it satisfies it too
        (``any_of`` keywords, topics). Then R(x<t, v) = 1 exactly after such a prefix (:meth:`prefix_satisfied`)."""
        return False

    def prefix_satisfied(self, prefixes: Sequence[str]) -> list[bool]:
        """For a :attr:`monotone` constraint: whether each text prefix already settles it, whatever comes next."""
        raise NotImplementedError(f"{self.name} is not a monotone constraint (no prefix of it settles it)")

    def prefix_probs(self, rows: Sequence[Sequence[int]], tokenizer) -> list[torch.Tensor]:
        """P(satisfied) of every prefix of each token row: ``out[i][j]`` scores ``rows[i][: j + 1]`` decoded by
        ``tokenizer``; a score the backend could not give reads 1.0 (no evidence of a violation).

        One oracle call on all prefixes (quadratic in the row length). A contextual classifier that reads the
        same token ids overrides it with one pass per row (:class:`~steer.constraints.ClassifierConstraint`).
        """
        rows = [[int(t) for t in row] for row in rows]
        prefixes = [row[: j + 1] for row in rows for j in range(len(row))]
        if not prefixes:
            return [torch.zeros(0) for _ in rows]
        scores = self.evaluate(tokenizer.batch_decode(prefixes, skip_special_tokens=True))
        flat = torch.where(
            scores.valid, scores.probs.float(), torch.ones_like(scores.probs, dtype=torch.float32)
        )
        return list(torch.split(flat, [len(row) for row in rows]))

    @abstractmethod
    def score(self, texts: list[str]) -> Sequence[float | None] | torch.Tensor:
        """Raw P(satisfied) per text; may contain NaN/None for failures."""

    def evaluate(self, texts: Sequence[str]) -> ConstraintScores:
        texts = [t if isinstance(t, str) else "" for t in texts]
        if not texts:
            return ConstraintScores(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        raw = self.score(texts)
        if len(raw) != len(texts):
            raise RuntimeError(f"{self.name}: backend returned {len(raw)} scores for {len(texts)} texts")
        scores = sanitize_scores(raw, fill=self.invalid_fill)
        self.stats["scored"] += len(texts)
        if scores.num_invalid:
            self.stats["invalid"] += scores.num_invalid
            logger.warning(
                "%s: %d of %d scores were NaN/None/out of range and are masked (total masked: %d)",
                self.name,
                scores.num_invalid,
                len(texts),
                self.stats["invalid"],
            )
        return scores

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.evaluate(texts).probs

    def fingerprint(self) -> str:
        """A stable description of this oracle (class + simple settings), for caches keyed by the oracle.

        Two constraints with equal fingerprints must score texts alike. The default covers the class and
        every public plain attribute (strings, numbers, and lists/tuples/dicts of them; counters and other
        state belong in ``_private`` attributes); a subclass whose
        behaviour also depends on something else (weights, a package version) should extend it.
        """

        def plain(value):
            if value is None or isinstance(value, (str, int, float, bool)):
                return True
            if isinstance(value, (list, tuple)):
                return all(plain(v) for v in value)
            if isinstance(value, dict):
                return all(isinstance(k, str) and plain(v) for k, v in value.items())
            return False

        settings = {
            k: v for k, v in sorted(vars(self).items()) if k != "stats" and not k.startswith("_") and plain(v)
        }
        members = [v for v in vars(self).values() if isinstance(v, Constraint)]
        members += [
            c
            for v in vars(self).values()
            if isinstance(v, (list, tuple))
            for c in v
            if isinstance(c, Constraint)
        ]
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}:{settings!r}:{[m.fingerprint() for m in members]}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
