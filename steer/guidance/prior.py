"""A token-level prior for the guidance model, from the oracle itself.

Guidance training moves ``R(x<t, v)`` only at tokens the policy sampled, so a head trained from scratch
leaves almost every vocabulary row at one constant value and ``q* ≈ p``. The oracle already knows which
token texts violate the constraint: :func:`token_prior` scores every vocabulary token's own text with
the constraint once (``P(satisfied | token text)``), caches the scores on disk per (oracle, tokenizer),
and :func:`prior_logits` turns them into the head bias the guidance model starts from, so tokens the
policy never sampled still carry the oracle's judgement.

The cache key is a digest of the constraint's :meth:`~steer.constraints.Constraint.fingerprint` and of the
tokenizer's vocabulary, so changing either recomputes the prior.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from ..constraints.base import Constraint

logger = logging.getLogger(__name__)

__all__ = ["prior_cache_path", "prior_logits", "token_prior", "token_texts", "tokenizer_fingerprint"]

PRIOR_FORMAT = 1


def token_texts(tokenizer, vocab_size: int | None = None) -> list[str]:
    """The decoded text of each token id ``0 .. vocab_size-1`` (ids beyond the tokenizer: ``""``)."""
    size = int(vocab_size if vocab_size is not None else len(tokenizer))
    known = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(min(size, known))], skip_special_tokens=True)
    return [t if isinstance(t, str) else "" for t in texts] + [""] * max(0, size - known)


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256()
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return digest.hexdigest()[:16]


def prior_cache_path(constraint: Constraint, tokenizer, vocab_size: int, cache_dir=None) -> Path:
    from ..models import cache_dir as steer_cache

    key = hashlib.sha256(
        f"{PRIOR_FORMAT}|{constraint.fingerprint()}|{tokenizer_fingerprint(tokenizer)}|{vocab_size}".encode()
    ).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir is not None else steer_cache() / "priors"
    return root / f"token_prior-{key}.safetensors"


def token_prior(
    constraint: Constraint,
    tokenizer,
    vocab_size: int | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 4096,
) -> Tensor:
    """``P(satisfied | token text)`` for every token id, ``[vocab_size]`` float32, cached on disk.

    Tokens with no text (special tokens, ids past the tokenizer) and tokens the oracle could not score get
    the median of the scored tokens, i.e. no opinion.
    """
    from safetensors.torch import load_file

    from ..io import atomic_save_file

    size = int(vocab_size if vocab_size is not None else len(tokenizer))
    path = prior_cache_path(constraint, tokenizer, size, cache_dir)
    if use_cache and path.is_file():
        try:
            prior = load_file(str(path))["prior"]
            if prior.shape == (size,):
                logger.info("token prior: loaded %s", path)
                return prior.float()
        except Exception as err:  # a corrupt cache file is recomputed, never trusted
            logger.warning("token prior: ignoring unreadable cache %s (%s)", path, err)
    texts = token_texts(tokenizer, size)
    has_text = torch.tensor([bool(t.strip()) for t in texts])
    scored = [i for i, ok in enumerate(has_text.tolist()) if ok]
    probs = torch.full((size,), math.nan)
    from tqdm.auto import tqdm

    with tqdm(total=len(scored), desc="token prior (oracle on every token's text)", unit="tok") as bar:
        for start in range(0, len(scored), batch_size):
            ids = scored[start : start + batch_size]
            result = constraint.evaluate([texts[i] for i in ids])
            values = torch.where(result.valid, result.probs.float(), torch.tensor(math.nan))
            probs[torch.tensor(ids)] = values
            bar.update(len(ids))
    valid = ~torch.isnan(probs)
    fill = float(probs[valid].median()) if valid.any() else 0.5
    probs = torch.where(valid, probs, torch.tensor(fill)).float()
    if use_cache:
        atomic_save_file(
            {"prior": probs.contiguous()},
            path,
            metadata={"constraint": constraint.fingerprint()[:500], "format": str(PRIOR_FORMAT)},
        )
        logger.info("token prior: %d tokens scored, cached at %s", len(scored), path)
    return probs


def prior_logits(prior: Tensor, *, floor: float = 0.01, sharpness: float = 1.0) -> Tensor:
    """Head bias for a prior: ``logit(clamp(prior, floor, 1 - floor)) * sharpness``."""
    if not 0.0 < floor < 0.5:
        raise ValueError(f"prior floor must be in (0, 0.5), got {floor}")
    p = prior.float().clamp(floor, 1.0 - floor)
    return (torch.log(p) - torch.log1p(-p)) * float(sharpness)
