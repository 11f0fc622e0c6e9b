"""Composition of constraints.

- :class:`AllOf`: every constraint must hold; P = product of the probabilities (independence).
- :class:`AnyOf`: at least one holds; P = 1 - prod(1 - p).
- :class:`Not`: P = 1 - p.
- :class:`Threshold`: hard 0/1 labels, P = 1 if p >= threshold.

A text that any member could not score (NaN/None) is invalid in the composite too: it is masked
and counted in the composite's ``stats`` (each member counts its own failures as well).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Constraint, hard_labels


def _members(constraints: Sequence[Constraint], what: str) -> list[Constraint]:
    members = list(constraints)
    if not members:
        raise ValueError(f"{what} needs at least one constraint")
    for c in members:
        if not isinstance(c, Constraint):
            raise TypeError(f"{what} members must be Constraint instances, got {type(c).__name__}")
    return members


def _masked(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Float64 scores with invalid entries set to NaN (the base class masks and counts them)."""
    out = probs.double().clone()
    out[~valid] = float("nan")
    return out


class AllOf(Constraint):
    """Conjunction: P(all satisfied) = prod_i P_i (the members are treated as independent)."""

    def __init__(self, constraints: Sequence[Constraint], *, name: str | None = None) -> None:
        super().__init__()
        self.constraints = _members(constraints, "AllOf")
        self.name = name or "all_of(" + ", ".join(c.name for c in self.constraints) + ")"

    def to(self, device) -> AllOf:
        for c in self.constraints:
            if hasattr(c, "to"):
                c.to(device)
        return self

    def score(self, texts: list[str]) -> torch.Tensor:
        probs = torch.ones(len(texts), dtype=torch.float64)
        valid = torch.ones(len(texts), dtype=torch.bool)
        for c in self.constraints:
            s = c.evaluate(texts)
            probs = probs * s.probs.double()
            valid &= s.valid
        return _masked(probs, valid)


class AnyOf(AllOf):
    """Disjunction: P(at least one satisfied) = 1 - prod_i (1 - P_i)."""

    def __init__(self, constraints: Sequence[Constraint], *, name: str | None = None) -> None:
        super().__init__(constraints, name=name)
        self.name = name or "any_of(" + ", ".join(c.name for c in self.constraints) + ")"

    def score(self, texts: list[str]) -> torch.Tensor:
        none = torch.ones(len(texts), dtype=torch.float64)
        valid = torch.ones(len(texts), dtype=torch.bool)
        for c in self.constraints:
            s = c.evaluate(texts)
            none = none * (1.0 - s.probs.double())
            valid &= s.valid
        return _masked(1.0 - none, valid)


class Not(Constraint):
    """Negation: P = 1 - P(constraint)."""

    def __init__(self, constraint: Constraint, *, name: str | None = None) -> None:
        super().__init__()
        self.constraint = _members([constraint], "Not")[0]
        self.name = name or f"not({constraint.name})"

    def to(self, device) -> Not:
        if hasattr(self.constraint, "to"):
            self.constraint.to(device)
        return self

    def score(self, texts: list[str]) -> torch.Tensor:
        s = self.constraint.evaluate(texts)
        return _masked(1.0 - s.probs.double(), s.valid)


class Threshold(Not):
    """Hard labels: 1.0 where P(constraint) >= ``threshold``, else 0.0 (shares :class:`Not`'s plumbing)."""

    def __init__(self, constraint: Constraint, threshold: float = 0.5, *, name: str | None = None) -> None:
        hard_labels(torch.zeros(1), threshold)  # validates the range
        super().__init__(constraint, name=name or f"threshold({constraint.name}, {threshold})")
        self.threshold = threshold

    def score(self, texts: list[str]) -> torch.Tensor:
        s = self.constraint.evaluate(texts)
        return _masked(hard_labels(s.probs, self.threshold), s.valid)
