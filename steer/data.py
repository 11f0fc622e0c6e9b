"""Where steer finds its datasets: the public sources, or a local mirror in ``STEER_DATA_DIR``.

``STEER_DATA_DIR`` (or, when unset, a ``shared/data`` directory beside the project checkout) holds
``rtp/*.jsonl`` (RealToxicityPrompts records) and ``opinionqa/American_Trends_Panel_W*/`` (OpinionQA's
release). Without a local mirror the normal online loaders are used.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, load_dataset

RTP_HUB_ID = "allenai/real-toxicity-prompts"
# The last N RealToxicityPrompts records: held out of training and guidance sampling by the recipes, and the
# prompts `steer eval toxicity` evaluates on. One constant so that both sides agree by default.
RTP_HELDOUT_SIZE = 400
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path | None:
    """The local data mirror, or ``None`` when steer should load from the public sources."""
    env = os.environ.get("STEER_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"STEER_DATA_DIR={env!r} is not a directory")
        return path
    for candidate in (_PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def opinionqa_dir() -> Path:
    """Directory holding OpinionQA's ``American_Trends_Panel_W*`` folders."""
    root = data_dir()
    if root is None or not (root / "opinionqa").is_dir():
        raise FileNotFoundError(
            "OpinionQA data not found: download OpinionQA's public release (its human_resp/ folders) and "
            "set STEER_DATA_DIR to a directory containing opinionqa/American_Trends_Panel_W*/"
        )
    return root / "opinionqa"


def load_rtp(limit: int | None = None) -> Dataset:
    """RealToxicityPrompts records (``prompt``/``continuation`` dicts with Perspective scores).

    Reads ``$STEER_DATA_DIR/rtp/*.jsonl`` when present, else ``load_dataset("allenai/real-toxicity-prompts")``.
    """
    root = data_dir()
    files = sorted((root / "rtp").glob("*.jsonl")) if root is not None and (root / "rtp").is_dir() else []
    if files:
        dataset = load_dataset("json", data_files=[str(f) for f in files], split="train")
    else:
        dataset = load_dataset(RTP_HUB_ID, split="train")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def rtp_prompts(dataset: Dataset) -> list[str]:
    """The prompt texts of RTP records."""
    return [record["text"] for record in dataset["prompt"]]


def rtp_documents(dataset: Dataset) -> list[str]:
    """Prompt + continuation, the fine-tuning corpus (it contains toxic text)."""
    return [p["text"] + c["text"] for p, c in zip(dataset["prompt"], dataset["continuation"])]
