"""Where steer finds its datasets: the public sources, or a local mirror in ``STEER_DATA_DIR``.

``STEER_DATA_DIR`` (or, when unset, a ``shared/data`` directory beside the project checkout) holds
``rtp/*.jsonl`` (RealToxicityPrompts records) and ``opinionqa/American_Trends_Panel_W*/`` (OpinionQA's
release). Without a local mirror the normal online loaders are used.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, load_dataset

from steer.errors import InputFileNotFoundError, UserInputError, first_line

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
            raise InputFileNotFoundError(f"STEER_DATA_DIR={env!r} is not a directory")
        return path
    for candidate in (_PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def opinionqa_dir() -> Path:
    """Directory holding OpinionQA's ``American_Trends_Panel_W*`` folders."""
    root = data_dir()
    if root is None or not (root / "opinionqa").is_dir():
        raise InputFileNotFoundError(
            "OpinionQA data not found: download OpinionQA's public release (its human_resp/ folders) and "
            "set STEER_DATA_DIR to a directory containing opinionqa/American_Trends_Panel_W*/"
        )
    return root / "opinionqa"


def load_rtp(limit: int | None = None, *, validate: bool = True) -> Dataset:
    """RealToxicityPrompts records (``prompt``/``continuation`` dicts with Perspective scores).

    Reads ``$STEER_DATA_DIR/rtp/*.jsonl`` when present, else ``load_dataset("allenai/real-toxicity-prompts")``.
    With ``validate`` every record must have ``prompt`` and ``continuation`` objects with a string ``text``
    (a :class:`~steer.errors.UserInputError` names the file and line of the first that has not).
    """
    root = data_dir()
    files = sorted((root / "rtp").glob("*.jsonl")) if root is not None and (root / "rtp").is_dir() else []
    if files:
        if all(_blank(f) for f in files):
            raise UserInputError(f"RealToxicityPrompts mirror {root / 'rtp'}: every *.jsonl file is empty")
        dataset = _load_json_files([f for f in files if not _blank(f)], what="RealToxicityPrompts mirror")
    else:
        dataset = load_dataset(RTP_HUB_ID, split="train")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if validate:
        check_rtp_records(dataset, [f for f in files if not _blank(f)])
    return dataset


def check_rtp_records(dataset: Dataset, files: list[Path] | None = None) -> None:
    """Every record has ``prompt`` and ``continuation`` objects with a string ``text``; else one clear error."""
    where = "RealToxicityPrompts"
    for part in ("prompt", "continuation"):
        if part not in dataset.column_names:
            raise UserInputError(
                f"{where} records have no {part!r} key (columns: {dataset.column_names}); expected "
                "{'prompt': {'text': ...}, 'continuation': {'text': ...}} per line"
            )
        first = _first_invalid_fast(dataset, part)
        if first is None:
            continue
        for index, value in enumerate(dataset[part]) if first < 0 else [(first, dataset[first][part])]:
            if not isinstance(value, dict) or not isinstance(value.get("text"), str):
                at = _locate(files or [], index) or f"{where} record {index}"
                if value is None:
                    problem = f"has no {part!r}"
                else:
                    problem = f"has a {part!r} without a string 'text' ({value!r:.80})"
                raise UserInputError(
                    f"{at}: RealToxicityPrompts record {problem}; expected "
                    "{'prompt': {'text': ...}, 'continuation': {'text': ...}} per line"
                )


def _first_invalid_fast(dataset: Dataset, part: str) -> int | None:
    """With Arrow: the first row whose ``part`` is null or has a null/non-string ``text`` (None: all valid);
    -1 when the column is not a struct with a string ``text`` (then every row is checked in Python)."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc

        column = dataset.with_format("arrow")[part]
        if isinstance(column, pa.Table):
            column = column.column(0)
        if not pa.types.is_struct(column.type) or column.type.get_field_index("text") < 0:
            return -1
        if not pa.types.is_string(column.type.field("text").type):
            return -1
        invalid = pc.or_(pc.is_null(column), pc.is_null(pc.struct_field(column, "text")))
        index = pc.index(invalid, True).as_py()
        return None if index < 0 else int(index)
    except Exception:  # noqa: BLE001 - any Arrow surprise: check in Python
        return -1


def _blank(path: Path) -> bool:
    """True for an empty (or whitespace-only) file."""
    size = path.stat().st_size
    if size == 0:
        return True
    if size > 1 << 16:
        return False
    return not path.read_bytes().strip()


def _locate(files: list[Path], index: int) -> str | None:
    """``file:line`` of the ``index``-th record of jsonl ``files`` read in order (blank lines skipped)."""
    seen = 0
    for path in files:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if seen == index:
                    return f"{path}:{number}"
                seen += 1
    return None


def _load_json_files(files: list[Path], *, what: str) -> Dataset:
    try:
        return load_dataset("json", data_files=[str(f) for f in files], split="train")
    except (StopIteration, ValueError) as err:
        raise UserInputError(
            f"{what}: cannot read {', '.join(map(str, files))} as JSON lines ({err})"
        ) from err
    except Exception as err:  # datasets wraps parse errors in DatasetGenerationError
        if type(err).__name__ == "DatasetGenerationError":
            cause = err.__cause__ or err
            raise UserInputError(
                f"{what}: cannot read {', '.join(map(str, files))} as JSON lines ({cause})"
            ) from err
        raise


TABLE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def looks_like_path(name: str) -> bool:
    """A dataset name meant as a local file (a table suffix, or a path-like start) rather than a hub id."""
    return Path(name).suffix in TABLE_TYPES or name.startswith(("/", "./", "../", "~"))


def load_table(name: str, split: str = "train", *, what: str = "dataset_name") -> Dataset:
    """A local ``.json``/``.jsonl``/``.csv``/``.parquet`` file or a hub dataset, with one-line errors naming
    ``what`` (the config field) and the file: missing, empty, unreadable, unsupported type, no records."""
    path = Path(name).expanduser()
    if path.is_file():
        kind = TABLE_TYPES.get(path.suffix)
        if kind is None:
            raise UserInputError(
                f"{what}={name!r}: unsupported file type {path.suffix!r} (use .json, .jsonl, .csv or .parquet)"
            )
        if _blank(path):
            raise UserInputError(f"{what}={name!r}: the file is empty (no records)")
        if kind == "json":
            dataset = _load_json_files([path], what=what)
        else:
            try:
                dataset = load_dataset(kind, data_files=str(path), split="train")
            except (StopIteration, ValueError, UnicodeDecodeError) as err:
                raise UserInputError(f"{what}={name!r}: cannot read the file as {kind} ({err})") from err
            except Exception as err:  # datasets wraps parse errors in DatasetGenerationError
                if type(err).__name__ != "DatasetGenerationError":
                    raise
                cause = err.__cause__ or err
                raise UserInputError(
                    f"{what}={name!r}: cannot read the file as {kind} ({first_line(cause)})"
                ) from err
    elif looks_like_path(name) or path.is_dir():
        raise InputFileNotFoundError(f"{what}={name!r}: file not found ({path})")
    else:
        try:
            dataset = load_dataset(name, split=split)
        except (FileNotFoundError, ConnectionError) as err:
            raise UserInputError(
                f"{what}={name!r}: neither a local .json/.jsonl/.csv/.parquet file nor a loadable hub dataset "
                f"({first_line(err)})"
            ) from err
    if len(dataset) == 0:
        raise UserInputError(f"{what}={name!r}: no records")
    return dataset


def rtp_prompts(dataset: Dataset) -> list[str]:
    """The prompt texts of RTP records."""
    return [record["text"] for record in dataset["prompt"]]


def rtp_documents(dataset: Dataset) -> list[str]:
    """Prompt + continuation, the fine-tuning corpus (it contains toxic text)."""
    return [p["text"] + c["text"] for p, c in zip(dataset["prompt"], dataset["continuation"])]


def prompt_budget(context: int | None, max_new_tokens: int) -> int | None:
    """The most prompt tokens a model with ``context`` positions takes when it generates ``max_new_tokens``
    (``context - max_new_tokens``); None when the context is unknown. Raises when nothing is left for a prompt."""
    if context is None:
        return None
    budget = int(context) - int(max_new_tokens)
    if budget < 1:
        raise UserInputError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens"
        )
    return budget


def truncate_prompts(prompts: list[str], tokenizer, budget: int | None) -> tuple[list[str], int]:
    """Cut every prompt longer than ``budget`` tokens (the tokenizer's special tokens included) on the left,
    keeping its end (the words a continuation follows). Returns the prompts and how many were cut.

    Left truncation is what a generator needs: the model's position limit is ``context = prompt + new tokens``,
    so steer's budget is the model's context minus the tokens to generate (:func:`prompt_budget`).
    """
    if budget is None or not prompts:
        return list(prompts), 0
    limit = budget - tokenizer.num_special_tokens_to_add()
    if limit < 1:
        raise UserInputError(f"a prompt budget of {budget} tokens leaves no room for prompt text")
    out, cut = [], 0
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for prompt, ids in zip(prompts, encoded):
        if len(ids) <= limit:
            out.append(prompt)
            continue
        kept = list(ids[-limit:])
        text = tokenizer.decode(kept)
        while kept and len(tokenizer(text, add_special_tokens=False)["input_ids"]) > limit:
            kept = kept[1:]  # decoding and re-encoding at the cut may merge differently
            text = tokenizer.decode(kept)
        out.append(text)
        cut += 1
    return out, cut
