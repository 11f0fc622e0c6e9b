"""Progress bars for steer's long phases, in the transformers/TRL conventions.

Bars are ``tqdm.auto`` bars on stderr that disappear when done (``leave=False``); the phase's outcome
goes to the log as one line. They are shown unless any of these turns them off, checked in this order:

* an explicit ``disable`` (``True``/``False``), e.g. from ``TrainingArguments.disable_tqdm``;
* ``STEER_NO_PROGRESS`` or ``TQDM_DISABLE`` set to a true value (``1``, ``true``, ``yes``, ``on``);
* transformers' switch (``transformers.utils.logging.disable_progress_bar()`` or
  ``HF_HUB_DISABLE_PROGRESS_BARS=1``);
* the transformers log level above WARNING, which is how ``TrainingArguments`` picks its own
  ``disable_tqdm`` default (``--log_level error`` silences the Trainer's bar and these alike).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

__all__ = ["chunks", "progress_bar", "progress_disabled"]

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def progress_disabled(disable: bool | None = None) -> bool:
    """Whether a steer progress bar is hidden (see the module docstring for the rules)."""
    if disable is not None:
        return bool(disable)
    if _env_flag("STEER_NO_PROGRESS") or _env_flag("TQDM_DISABLE"):
        return True
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        return True
    return hf_logging.get_verbosity() > logging.WARNING


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    disable: bool | None = None,
    leave: bool = False,
    **kwargs,
):
    """A ``tqdm.auto.tqdm`` over ``iterable`` (or a manual bar with ``total``), on or off per the rules."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=progress_disabled(disable),
        leave=leave,
        dynamic_ncols=True,
        **kwargs,
    )


def chunks(
    items: Sequence[T], size: int, *, desc: str | None = None, unit: str = "it", disable: bool | None = None
) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size``, with a bar counting items (not slices)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    with progress_bar(total=len(items), desc=desc, unit=unit, disable=disable) as bar:
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            yield chunk
            bar.update(len(chunk))
