"""Where the real OpinionQA data is, for tests that skip without it."""

from __future__ import annotations

from pathlib import Path


def opinionqa_root() -> Path | None:
    """The OpinionQA release directory (``STEER_DATA_DIR``'s ``opinionqa/``), or None when it is not there."""
    from steer.data import opinionqa_dir

    try:
        root = Path(opinionqa_dir())
    except FileNotFoundError:
        return None
    return root if (root / "American_Trends_Panel_W26" / "info.csv").is_file() else None
