"""A context prior for the guidance model: the oracle's judgement of words that span several tokens.

The token prior (:mod:`steer.guidance.prior`) scores every token's own text, so it cannot see a word the
tokenizer splits: SmolLM2 writes " fuck" as " f" + "uck", and neither piece is profane on its own. Measured
on the detox recipe's validation generations, about half of the toxic continuations that survived the
constraint were such words. :func:`context_prior` reads the words of the training texts, scores each with the
constraint once (cached per oracle, tokenizer and word list), and for every flagged word (and every flagged
leading part of it) records the token that *completes* it after the tokens before it:

    prefix (up to :data:`MAX_PREFIX` tokens) -> completing token : z offset

:class:`ContextPrior` adds those offsets to the guidance logits ``z`` wherever a context ends in the prefix,
so that at the start of training ``R(" f", "uck") = P(satisfied | " fuck")`` instead of the token prior's
``P(satisfied | "uck")``. The offsets are fixed (not trained); the learned head and adapter refine R on top.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..constraints.base import Constraint

logger = logging.getLogger(__name__)

__all__ = ["MAX_PREFIX", "ContextPrior", "context_prior", "lexicon"]

MAX_PREFIX = 3  # tokens of context an entry looks at (longer words: their last MAX_PREFIX tokens)
CONTEXT_FORMAT = 1
_WILDCARD = -1  # a prefix shorter than MAX_PREFIX: its left slots match anything
_NO_TOKEN = -2  # a context slot before the sequence start or on padding: matches only the wildcard
_WORD = re.compile(r"[^\W\d_]{2,}")


def lexicon(texts: Iterable[str]) -> list[str]:
    """The distinct lower-cased words (letters only, at least two) of ``texts``, sorted."""
    words = set()
    for text in texts:
        words.update(word.lower() for word in _WORD.findall(text))
    return sorted(words)


def _variants(word: str) -> list[str]:
    forms = dict.fromkeys([word, word.capitalize(), word.upper()])
    return [f"{space}{form}" for form in forms for space in (" ", "")]


class ContextPrior:
    """Sparse guidance-logit offsets: ``M`` entries ``(prefix [L], token, offset)``.

    A context (the last ``L`` tokens up to and including position ``t``) matches an entry when its last tokens
    equal the entry's prefix (:data:`_WILDCARD` slots match anything); then ``z[t, token] += offset``.
    """

    def __init__(self, prefixes: Tensor, tokens: Tensor, offsets: Tensor) -> None:
        if prefixes.dim() != 2 or prefixes.shape[0] != tokens.shape[0] or tokens.shape != offsets.shape:
            raise ValueError(
                f"context prior: prefixes [M, L], tokens [M] and offsets [M] expected, got "
                f"{tuple(prefixes.shape)}, {tuple(tokens.shape)}, {tuple(offsets.shape)}"
            )
        self.prefixes, self.tokens, self.offsets = prefixes.long(), tokens.long(), offsets.float()
        self._on: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def width(self) -> int:
        return int(self.prefixes.shape[1])

    def _tensors(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (self.prefixes.to(device), self.tokens.to(device), self.offsets.to(device))
        return self._on[device]

    def __getstate__(self) -> dict:  # pickled for a worker process: CPU tensors only
        return {"prefixes": self.prefixes, "tokens": self.tokens, "offsets": self.offsets}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefixes"], state["tokens"], state["offsets"])

    # ------------------------------------------------------------------ lookups
    def contexts(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[B, T, L]``: the last ``L`` tokens ending at each position (padding and the pre-start: no token)."""
        ids = input_ids.long()
        if attention_mask is not None:
            ids = ids.masked_fill(attention_mask.to(ids.device) == 0, _NO_TOKEN)
        width = self.width
        padded = torch.nn.functional.pad(ids, (width - 1, 0), value=_NO_TOKEN)
        return padded.unfold(1, width, 1)  # [B, T, L], slot L-1 is the position itself

    def _match(self, contexts: Tensor) -> Tensor:
        """``[N, M]`` whether each context row ends in each entry's prefix."""
        prefixes, _, _ = self._tensors(contexts.device)
        if contexts.shape[-1] != self.width:
            raise ValueError(f"contexts must be [N, {self.width}], got {tuple(contexts.shape)}")
        equal = (contexts[:, None, :] == prefixes[None]) | (prefixes[None] == _WILDCARD)
        return equal.all(-1)

    def _matched(self, contexts: Tensor, tokens: Tensor | None = None) -> Tensor:
        """``[N, M]``: entry matches (for appending ``tokens [N]`` when given)."""
        match = self._match(contexts)
        if tokens is not None:
            _, entry_tokens, _ = self._tensors(contexts.device)
            match &= tokens.to(contexts.device)[:, None].long() == entry_tokens[None]
        return match

    def add_(self, z: Tensor, contexts: Tensor) -> Tensor:
        """Add the offsets to ``z [N, V]`` in place (``contexts [N, L]``); returns ``z``.

        Where several entries match one (row, token) (a word inside a longer word), the lowest offset counts.
        """
        if len(self) == 0 or z.shape[0] == 0:
            return z
        _, tokens, offsets = self._tensors(z.device)
        rows, entries = self._matched(contexts.to(z.device)).nonzero(as_tuple=True)
        if rows.numel():
            keys, inverse = torch.unique(rows * z.shape[1] + tokens[entries], return_inverse=True)
            lowest = torch.zeros(keys.shape[0], dtype=torch.float32, device=z.device)
            lowest.scatter_reduce_(0, inverse, offsets[entries], reduce="amin", include_self=True)
            z.view(-1).index_add_(0, keys, lowest.to(z.dtype))
        return z

    def offsets_at(self, contexts: Tensor, tokens: Tensor) -> Tensor:
        """``[N]`` the offset for appending ``tokens [N]`` after ``contexts [N, L]`` (0 where nothing matches)."""
        if len(self) == 0 or tokens.numel() == 0:
            return torch.zeros(tokens.shape[0], dtype=torch.float32, device=tokens.device)
        _, _, offsets = self._tensors(tokens.device)
        match = self._matched(contexts.to(tokens.device), tokens)
        return torch.where(match, offsets[None], 0.0).amin(-1).clamp(max=0.0)

    def flags_at(self, contexts: Tensor, tokens: Tensor) -> Tensor:
        """``[N]`` whether appending ``tokens`` after ``contexts`` completes a flagged word (part)."""
        if len(self) == 0 or tokens.numel() == 0:
            return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        return self._matched(contexts.to(tokens.device), tokens).any(-1)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Tensor]:
        return {
            "prefixes": self.prefixes.contiguous(),
            "tokens": self.tokens.contiguous(),
            "offsets": self.offsets.contiguous(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Tensor], *, source: str = "context prior") -> ContextPrior:
        missing = {"prefixes", "tokens", "offsets"} - set(state)
        if missing:
            raise ValueError(f"{source}: missing tensors {sorted(missing)}")
        return cls(state["prefixes"], state["tokens"], state["offsets"])


def _cache_path(key: str, cache_dir) -> Path:
    from ..models import cache_dir as steer_cache

    root = Path(cache_dir) if cache_dir is not None else steer_cache() / "priors"
    return root / f"context_prior-{key}.safetensors"


def context_prior(
    constraint: Constraint,
    tokenizer,
    words: Sequence[str],
    token_prior: Tensor,
    *,
    floor: float = 0.01,
    threshold: float = 0.5,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 4096,
) -> ContextPrior:
    """Entries for the words in ``words`` that the constraint flags and the tokenizer splits.

    Each word is scored in lower case (P(satisfied) < ``threshold`` flags it); each of its forms (lower,
    Capitalised, UPPER; with and without a leading space) is tokenised, and for every leading part of two or
    more tokens whose text the constraint also flags, the entry ``prefix -> last token`` gets the offset
    ``logit(P(word part)) - logit(token_prior[last token])`` (both clipped to ``[floor, 1 - floor]``), so that
    a head started from the token prior gives ``z = logit(P(word part))`` there. Entries that would raise
    ``z`` are dropped. Cached on disk per (oracle, tokenizer, word list, floor, threshold).
    """
    from safetensors.torch import load_file

    from ..io import atomic_save_file
    from .prior import tokenizer_fingerprint

    words = sorted({w.lower() for w in words if w and w.strip()})
    vocab = int(token_prior.shape[0])
    digest = hashlib.sha256(json.dumps(words).encode()).hexdigest()
    key = hashlib.sha256(
        f"{CONTEXT_FORMAT}|{constraint.fingerprint()}|{tokenizer_fingerprint(tokenizer)}|{vocab}|{digest}|"
        f"{floor}|{threshold}|{MAX_PREFIX}".encode()
    ).hexdigest()[:20]
    path = _cache_path(key, cache_dir)
    if use_cache and path.is_file():
        try:
            prior = ContextPrior.from_state(load_file(str(path)), source=str(path))
            logger.info("context prior: loaded %s (%d entries)", path, len(prior))
            return prior
        except Exception as err:  # a corrupt cache file is recomputed, never trusted
            logger.warning("context prior: ignoring unreadable cache %s (%s)", path, err)

    def score(texts: list[str]) -> dict[str, float]:
        out = {}
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            result = constraint.evaluate(chunk)
            for text, ok, p in zip(chunk, result.valid.tolist(), result.probs.tolist()):
                if ok:
                    out[text] = float(p)
        return out

    scores = score(words)
    flagged = [w for w in words if scores.get(w, 1.0) < threshold]
    # every leading part (>= 2 tokens) of every form of a flagged word, with its text
    parts: set[tuple[int, ...]] = set()
    for word in flagged:
        for form in _variants(word):
            ids = tokenizer(form, add_special_tokens=False)["input_ids"]
            parts.update(tuple(ids[:end]) for end in range(2, len(ids) + 1))
    texts = {ids: tokenizer.decode(list(ids)) for ids in sorted(parts)}
    part_scores = score(sorted(set(texts.values())))

    def logit(p: float) -> float:
        p = min(max(p, floor), 1.0 - floor)
        return math.log(p) - math.log1p(-p)

    best: dict[tuple[tuple[int, ...], int], float] = {}
    for ids, text in texts.items():
        p = part_scores.get(text)
        if p is None or p >= threshold or ids[-1] >= vocab:
            continue
        offset = logit(p) - logit(float(token_prior[ids[-1]]))
        if offset >= 0:
            continue
        prefix = ids[:-1][-MAX_PREFIX:]
        entry = ((_WILDCARD,) * (MAX_PREFIX - len(prefix)) + prefix, ids[-1])
        best[entry] = min(offset, best.get(entry, 0.0))
    entries = sorted(best.items())
    prior = ContextPrior(
        torch.tensor([e[0][0] for e in entries], dtype=torch.long).view(-1, MAX_PREFIX),
        torch.tensor([e[0][1] for e in entries], dtype=torch.long),
        torch.tensor([e[1] for e in entries], dtype=torch.float32),
    )
    logger.info(
        "context prior: %d of %d words flagged by %s, %d entries (word parts the tokenizer splits)",
        len(flagged),
        len(words),
        constraint.name,
        len(prior),
    )
    if use_cache:
        atomic_save_file(
            prior.state(),
            path,
            metadata={"constraint": constraint.fingerprint()[:500], "words": str(len(words))},
        )
    return prior
