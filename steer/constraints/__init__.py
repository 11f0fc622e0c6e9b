"""Sequence-level constraints (oracles): texts -> P(constraint satisfied)."""

from .base import Constraint, ConstraintScores, hard_labels, sanitize_scores, soft_labels
from .classifier import ClassifierConstraint, SequenceClassifierRunner
from .composite import AllOf, AnyOf, Not, Threshold
from .keyword import CallableConstraint, KeywordConstraint, keyword_pattern
from .toxicity import NonToxic, load_detoxify, write_random_detoxify_checkpoint

__all__ = [
    "AllOf",
    "AnyOf",
    "CallableConstraint",
    "ClassifierConstraint",
    "Constraint",
    "ConstraintScores",
    "KeywordConstraint",
    "NonToxic",
    "Not",
    "SequenceClassifierRunner",
    "Threshold",
    "hard_labels",
    "keyword_pattern",
    "load_detoxify",
    "sanitize_scores",
    "soft_labels",
    "write_random_detoxify_checkpoint",
]
