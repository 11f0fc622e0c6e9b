"""The NADO half of steer: guidance model, closed-form constraint KL, sampling and guided decoding."""

from .decoding import NADOLogitsProcessor, guided_generate, guided_sample
from .kl import constraint_kl, constraint_kl_naive, guided_log_probs
from .model import GuidanceConfig, GuidanceModel
from .objective import guidance_loss, importance_weights
from .sampling import LabelledSamples, SampleBatch, label_samples, sample_continuations

__all__ = [
    "GuidanceConfig",
    "GuidanceModel",
    "LabelledSamples",
    "NADOLogitsProcessor",
    "SampleBatch",
    "constraint_kl",
    "constraint_kl_naive",
    "guidance_loss",
    "guided_generate",
    "guided_log_probs",
    "guided_sample",
    "importance_weights",
    "label_samples",
    "sample_continuations",
]
