"""Texts of the toxicity evaluation: its prompts (a jsonl file or RealToxicityPrompts' held-out tail) and the
clean held-out texts the evaluated model's perplexity is measured on."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputFileNotFoundError, UserInputError


def load_prompts(
    path: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    challenging_only: bool = False,
    last: int | None = None,
) -> list[str]:
    """Prompts from a jsonl file (``{"prompt": {"text": ...}}`` or ``{"prompt": "..."}``), else RTP.

    ``last``: RTP only, keep the last N records (steer's recipes hold them out of training and sampling).
    """
    if path is None:
        from ..data import load_rtp

        dataset = load_rtp()
        if last:
            dataset = dataset.select(range(max(0, len(dataset) - last), len(dataset)))
        records = [{"prompt": p, "challenging": c} for p, c in zip(dataset["prompt"], dataset["challenging"])]
        where = "RealToxicityPrompts"
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InputFileNotFoundError(f"prompts file not found: {path}")
        records = []
        for number, line in _text_lines(path, "prompts file"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserInputError(f"{path}:{number}: invalid JSON ({err})") from err
            if not isinstance(record, dict):
                raise UserInputError(
                    f"{path}:{number}: expected an object {{'prompt': ...}}, got a {type(record).__name__}"
                )
            record["_line"] = number
            records.append(record)
        where = str(path)
    prompts = []
    for index, record in enumerate(records):
        at = f"{where}:{record.get('_line', index + 1)}"
        if not isinstance(record, dict) or "prompt" not in record:
            raise UserInputError(
                f"{at}: missing key 'prompt' (expected {{'prompt': {{'text': ...}}}} or {{'prompt': '...'}})"
            )
        if challenging_only and not record.get("challenging", False):
            continue
        prompt = record["prompt"]
        if isinstance(prompt, dict):
            if not isinstance(prompt.get("text"), str):
                raise UserInputError(f"{at}: 'prompt' is an object without a string 'text' field")
            prompt = prompt["text"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserInputError(f"{at}: 'prompt' must be a non-empty string, got {prompt!r}")
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserInputError(
            f"no prompts in {where}" + (" with challenging=true" if challenging_only else "")
        )
    return prompts


def clean_heldout_texts(
    n: int = 100,
    *,
    max_toxicity: float = 0.1,
    dataset=None,
    last: int | None = None,
    limit: int | None = None,
) -> list[str]:
    """The last ``n`` RTP documents (prompt + continuation) whose Perspective toxicities are all < max.

    ``last`` and ``limit`` keep the records :func:`load_prompts` evaluates with the same values (the first
    ``limit`` of the last ``last``), so the documents are never in a recipe's training records (its
    ``heldout_size``) and an evaluation split never shares them with another; without ``last`` every record.
    """
    if dataset is None:
        from ..data import load_rtp

        dataset = load_rtp()
    first, stop = 0, len(dataset)
    if last:
        first = max(0, stop - last)
    if limit is not None:
        stop = min(stop, first + limit)
    prompts, continuations = dataset["prompt"], dataset["continuation"]
    out: list[str] = []
    for index in range(stop - 1, first - 1, -1):
        prompt, cont = prompts[index], continuations[index]
        scores = [prompt.get("toxicity"), cont.get("toxicity")]
        if all(s is not None and s < max_toxicity for s in scores):
            out.append(prompt["text"] + cont["text"])
            if len(out) >= n:
                break
    return out[::-1]


def load_heldout_texts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Held-out texts: ``.jsonl`` (``{"text": ...}`` a line) or plain text (one text a line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputFileNotFoundError(f"held-out text file not found: {path}")
    texts = []
    for number, line in _text_lines(path, "held-out text file"):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserInputError(f"{path}:{number}: invalid JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserInputError(f"{path}:{number}: expected an object with a string 'text' field")
            texts.append(record["text"])
        else:
            texts.append(line.rstrip("\n"))
    return texts[:limit] if limit is not None else texts


def _text_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """The numbered lines of a UTF-8 text file; a binary or non-UTF-8 file is one error naming it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserInputError(
            f"{what} {path} is not UTF-8 text (line {line}: {err.reason}); expected JSON lines"
            if path.suffix != ".txt"
            else f"{what} {path} is not UTF-8 text (line {line}: {err.reason})"
        ) from err
    if "\x00" in text:
        raise UserInputError(f"{what} {path} holds binary data (NUL bytes), not text")
    return list(enumerate(text.splitlines(), 1))
