"""The NADO half of steer: guidance model, the constraint objective (KL towards q*), sampling and guided decoding."""

from .constraint_kl import ConstraintKL, KLOutput, KLSettings
from .decoding import NADOLogitsProcessor, guided_generate, guided_sample, prefix_settled_by, settled_by
from .fused_kl import FusedConstraintKL, FusedKLOutput, fused_chunk_size, fused_constraint_kl
from .kl import constraint_kl, constraint_kl_naive, guided_log_probs
from .model import GuidanceConfig, GuidanceModel
from .objective import guidance_loss, guidance_loss_from_hidden, importance_weights, suffix_importance_weights
from .prior import prior_logits, token_prior
from .sampling import LabelledSamples, SampleBatch, label_samples, sample_continuations

__all__ = [
    "ConstraintKL",
    "FusedConstraintKL",
    "FusedKLOutput",
    "GuidanceConfig",
    "GuidanceModel",
    "KLOutput",
    "KLSettings",
    "LabelledSamples",
    "NADOLogitsProcessor",
    "SampleBatch",
    "constraint_kl",
    "constraint_kl_naive",
    "fused_chunk_size",
    "fused_constraint_kl",
    "guidance_loss",
    "guidance_loss_from_hidden",
    "guided_generate",
    "guided_log_probs",
    "guided_sample",
    "prefix_settled_by",
    "settled_by",
    "importance_weights",
    "label_samples",
    "prior_logits",
    "sample_continuations",
    "suffix_importance_weights",
    "token_prior",
]
