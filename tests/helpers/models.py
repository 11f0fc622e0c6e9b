"""A tiny random llama saved as a model directory (for tests that pass a model path to the CLI or a loader)."""

from __future__ import annotations

from pathlib import Path

from steer.models import tiny_causal_lm


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    model, tokenizer = tiny_causal_lm("llama", seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
