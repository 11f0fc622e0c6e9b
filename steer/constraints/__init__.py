"""Sequence-level constraints (oracles): texts -> P(constraint satisfied)."""

from .base import Constraint, ConstraintScores, hard_labels, sanitize_scores, soft_labels
from .toxicity import NonToxic

__all__ = ["Constraint", "ConstraintScores", "NonToxic", "hard_labels", "sanitize_scores", "soft_labels"]
