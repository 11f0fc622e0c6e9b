"""What the oracle already knows, set up once per run: the token prior, its flags and the context prior.

:func:`oracle_priors` computes (or reads from their caches) the token prior (:func:`~steer.guidance.token_prior`:
the oracle's score of every vocabulary token's own text), the tokens it flags (``prior < threshold``: where the
corpus KL stops) and, optionally, the context prior of split words (:func:`~steer.guidance.context_prior.
context_prior`). :meth:`OraclePriors.apply` starts a :class:`~steer.guidance.GuidanceModel` from them.

What a token's own text means depends on the constraint (:attr:`~steer.constraints.Constraint.token_evidence`):
for ``"violation"`` constraints (toxicity, ban lists) a low score marks a token that fails the sequence, as
above. For ``"satisfaction"`` constraints (a topic's words) a high score marks a token that settles it: R starts
near 1 there, every other token carries no evidence and starts at the warm-up round's satisfaction rate
(``label_rows``), nothing is flagged and there is no context prior. For ``"none"`` (single tokens say nothing)
every token starts at that rate. Whether a token helps *later*, the guidance model has to learn.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..constraints.base import Constraint
from .context_prior import ContextPrior, context_prior, lexicon
from .model import GuidanceModel
from .prior import prior_logits, token_prior

logger = logging.getLogger(__name__)

# A token prior that flags more than this share of the vocabulary gets a warning: a violation oracle flags
# the few tokens that break the constraint on their own (swear words), not most of the vocabulary.
FLAGGED_WARN_SHARE = 0.25

__all__ = ["OraclePriors", "oracle_priors"]


@dataclass
class OraclePriors:
    """``token``: ``[V]`` P(satisfied) of each token's own text; ``flagged``: ``token < threshold``;
    ``context``: the split words' offsets. Each ``None`` where it was not asked for."""

    token: Tensor | None = None
    flagged: Tensor | None = None
    context: ContextPrior | None = None
    floor: float = 0.02
    token_head: bool = False  # whether the guidance head starts from the token prior
    # [V] bool: the head rows that start at the warm-up round's satisfaction rate (GuidanceLearner), or None
    label_rows: Tensor | None = None

    def apply(self, guidance: GuidanceModel) -> None:
        """Start ``guidance`` from the priors: the head bias from the token prior, the context prior's offsets."""
        if self.token_head and self.token is not None:
            bias = prior_logits(self.token, floor=self.floor)
            if self.label_rows is not None:  # no evidence yet: 0 until the warm-up round sets the rate
                bias = bias.masked_fill(self.label_rows, 0.0)
            guidance.init_head(bias)
        guidance.set_context_prior(self.context)


def oracle_priors(
    constraint: Constraint,
    tokenizer,
    vocab_size: int,
    *,
    token_head: bool,
    token_flags: bool,
    context_texts: Callable[[], list[str]] | None = None,
    floor: float = 0.02,
    threshold: float = 0.5,
    cache_dir=None,
    once: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> OraclePriors:
    """The priors a run needs: the token prior when the head starts from it (``token_head``) or the corpus KL
    stops at flagged tokens (``token_flags``), and the context prior of the words in ``context_texts()`` (with
    the token prior only). ``once``: a context in which the oracle runs (e.g. the main process first, so that
    the other processes read its caches and every process starts from the same head)."""
    evidence = getattr(constraint, "token_evidence", "violation")
    if evidence not in ("violation", "satisfaction", "none"):
        raise ValueError(
            f"{constraint.name}: token_evidence must be 'violation', 'satisfaction' or 'none', got {evidence!r}"
        )
    priors = OraclePriors(floor=floor, token_head=token_head)
    if evidence != "violation" and token_head:
        logger.info(
            "%s: a token's own text %s; tokens without that evidence start at the warm-up satisfaction rate, "
            "nothing is flagged and there is no context prior",
            constraint.name,
            "can settle the constraint"
            if evidence == "satisfaction"
            else "says nothing about the constraint",
        )
    if evidence == "none":
        if token_head:
            priors.label_rows = torch.ones(int(vocab_size), dtype=torch.bool)
        return priors
    if not (token_head or (token_flags and evidence == "violation")):
        return priors
    with once():
        priors.token = token_prior(constraint, tokenizer, int(vocab_size), cache_dir=cache_dir)
    if evidence == "satisfaction":
        priors.label_rows = priors.token < threshold
        return priors
    priors.flagged = priors.token < threshold
    share = float(priors.flagged.float().mean())
    logger.info(
        "token prior: %d of %d tokens flagged by %s on their own text",
        int(priors.flagged.sum()),
        priors.flagged.numel(),
        constraint.name,
    )
    if token_flags and share > FLAGGED_WARN_SHARE:  # the stops are on
        logger.warning(
            "token prior: %s flags %.0f%% of the vocabulary on its own (score < %g; median score %.3f): such "
            "flags are not evidence (a contextual classifier unsure of single tokens), yet every flag stops the "
            "corpus KL (kl_corpus_stop_at_violation); consider a lower label_threshold (flags where the oracle is "
            "sure) or kl_corpus_stop_at_violation false (watch for degenerate text: the corpus KL then acts everywhere)",
            constraint.name,
            100 * share,
            threshold,
            float(priors.token.median()),
        )
    if context_texts is not None:
        with once():
            priors.context = context_prior(
                constraint,
                tokenizer,
                lexicon(context_texts()),
                priors.token,
                floor=floor,
                threshold=threshold,
                cache_dir=cache_dir,
            )
    return priors
