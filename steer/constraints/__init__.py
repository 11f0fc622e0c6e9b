"""Sequence-level constraints (oracles): texts -> P(constraint satisfied)."""

from .base import Constraint, ConstraintScores, hard_labels, sanitize_scores, soft_labels
from .classifier import ClassifierConstraint, SequenceClassifierRunner
from .composite import AllOf, AnyOf, Not, Threshold
from .keyword import CallableConstraint, KeywordConstraint, keyword_pattern
from .registry import CONSTRAINTS, build_constraint, constraint_kwargs
from .topics import TOPICS, topic_constraint
from .toxicity import NonToxic, load_detoxify, write_random_detoxify_checkpoint

__all__ = [
    "CONSTRAINTS",
    "AllOf",
    "AnyOf",
    "CallableConstraint",
    "ClassifierConstraint",
    "Constraint",
    "ConstraintScores",
    "KeywordConstraint",
    "NonToxic",
    "TOPICS",
    "Not",
    "SequenceClassifierRunner",
    "Threshold",
    "build_constraint",
    "constraint_kwargs",
    "hard_labels",
    "keyword_pattern",
    "load_detoxify",
    "sanitize_scores",
    "soft_labels",
    "topic_constraint",
    "write_random_detoxify_checkpoint",
]
