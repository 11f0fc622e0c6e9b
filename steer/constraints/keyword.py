"""Lexical and user-defined oracles: :class:`KeywordConstraint` and :class:`CallableConstraint`."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from .base import Constraint

MODES = ("none_of", "all_of", "any_of")


def keyword_pattern(keyword: str, *, case_sensitive: bool = False) -> re.Pattern:
    """Whole-word regex for ``keyword``.

    A keyword matches only where it is not glued to other word characters (letters, digits, ``_``)
    on either side: ``"ass"`` matches ``"an ass."`` but not ``"class"`` or ``"assess"``. Multi-word
    keywords match across any run of whitespace (``"shut up"`` matches ``"shut\\n up"``). Characters
    inside the keyword are literal (``"f*ck"`` matches only the text ``f*ck``).
    """
    words = keyword.split()
    if not words:
        raise ValueError(f"empty keyword {keyword!r}")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", 0 if case_sensitive else re.IGNORECASE)


class KeywordConstraint(Constraint):
    """Hard lexical constraint with whole-word matching (see :func:`keyword_pattern`).

    Modes: ``"none_of"`` (satisfied iff no keyword occurs: a ban list), ``"all_of"`` (iff every
    keyword occurs: lexically constrained generation), ``"any_of"`` (iff at least one occurs).
    Scores are 1.0 / 0.0. ``banned=`` is an alias of ``keywords`` (natural with ``mode="none_of"``).
    """

    def __init__(
        self,
        keywords: Sequence[str] | None = None,
        *,
        banned: Sequence[str] | None = None,
        mode: str = "none_of",
        case_sensitive: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if (keywords is None) == (banned is None):
            raise ValueError("KeywordConstraint takes exactly one of keywords= or banned=")
        words = list(keywords if keywords is not None else banned)
        if isinstance(keywords if keywords is not None else banned, str):
            raise TypeError("KeywordConstraint expects a list of keywords, not a single string")
        if not words:
            raise ValueError("KeywordConstraint needs at least one keyword")
        if mode not in MODES:
            raise ValueError(f"unknown KeywordConstraint mode {mode!r}; available: {', '.join(MODES)}")
        self.keywords = words
        self.mode = mode
        self.case_sensitive = case_sensitive
        self.patterns = [keyword_pattern(w, case_sensitive=case_sensitive) for w in words]
        self.name = name or f"keywords[{mode}:{len(words)}]"

    @property
    def token_evidence(self) -> str:
        """A banned word in a token's text fails the sequence (``none_of``); one of ``any_of``'s keywords
        satisfies it; a single token settles ``all_of`` only when it holds every keyword."""
        return {"none_of": "violation", "any_of": "satisfaction"}.get(self.mode, "none")

    @property
    def monotone(self) -> bool:
        """``any_of``: once a keyword is written, every continuation keeps it."""
        return self.mode == "any_of"

    def prefix_satisfied(self, prefixes: Sequence[str]) -> list[bool]:
        """``any_of``: a keyword occurs and is closed, i.e. followed by a character (a keyword at the very end of a
        prefix may still grow into another word: "vote" -> "voters")."""
        if not self.monotone:
            return super().prefix_satisfied(prefixes)
        return [any(m.end() < len(t) for p in self.patterns for m in p.finditer(t)) for t in prefixes]

    def matches(self, text: str) -> list[str]:
        """The keywords that occur in ``text``."""
        return [w for w, p in zip(self.keywords, self.patterns) if p.search(text)]

    def score(self, texts: list[str]) -> list[float]:
        out = []
        for text in texts:
            hits = [p.search(text) is not None for p in self.patterns]
            ok = {"none_of": not any(hits), "all_of": all(hits), "any_of": any(hits)}[self.mode]
            out.append(1.0 if ok else 0.0)
        return out


class CallableConstraint(Constraint):
    """Wrap a Python function as a constraint.

    ``batched=True``: ``fn(texts: list[str]) -> sequence of P(satisfied)`` (floats or bools).
    ``batched=False``: ``fn(text: str) -> float | bool | None``, called per text; an exception
    for one text makes that score ``None`` (masked and counted by :meth:`evaluate`) unless
    ``raise_errors=True``.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        name: str | None = None,
        batched: bool = True,
        raise_errors: bool = False,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"CallableConstraint needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.batched = batched
        self.raise_errors = raise_errors
        self.name = name or getattr(fn, "__name__", "callable")

    def fingerprint(self) -> str:
        """The function's identity: its qualified name, byte code, constants and closure values."""
        import hashlib

        fn = self.fn
        code = getattr(fn, "__code__", None)
        digest = hashlib.sha256(
            f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}".encode()
        )
        if code is not None:
            digest.update(code.co_code)
            digest.update(repr(code.co_consts).encode())
            for cell in getattr(fn, "__closure__", None) or ():
                digest.update(repr(cell.cell_contents)[:10_000].encode())
        else:  # a callable object: its repr (which may name an address: then the cache simply never hits)
            digest.update(repr(fn).encode())
        return f"{super().fingerprint()}|fn:{digest.hexdigest()[:20]}"

    @staticmethod
    def _as_float(value) -> float | None:
        if value is None:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    def score(self, texts: list[str]) -> list[float | None]:
        if self.batched:
            values = self.fn(list(texts))
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            return [self._as_float(v) for v in values]
        out: list[float | None] = []
        for text in texts:
            try:
                out.append(self._as_float(self.fn(text)))
            except Exception:
                if self.raise_errors:
                    raise
                out.append(None)
        return out
