"""Loaders for the real OpinionQA / Pew American Trends Panel formats.

Public API
----------
``Question``
    One survey question: ``key`` (e.g. ``SAFECRIME_W26``), ``text``, ``options`` (the non-refusal options
    sorted by their ordinal, stable for ties), ``ordinals`` (raw ordinal per option, same order),
    ``scaled`` (``(o - min) / (max - min)`` per option, or ``None`` for a nominal question whose
    ordinals are all equal), ``refusals`` (options beyond the ordinal list: "Refused", "Not sure", ...),
    ``references`` (the options in the file's presentation order, refusals last), ``mapping`` (Pew codes).
``load_wave(path, on_error="raise") -> dict[str, Question]``
    ``path`` is a wave directory or its ``info.csv``.
``load_waves(root=None, waves=None) -> dict[str, Question]``
    Several waves merged (``waves`` like ``[26, "W27", "American_Trends_Panel_W29"]``; default: all).
``load_metadata(wave_dir) -> dict[str, list[str]]``
    The demographic attributes of ``metadata.csv`` and their options.
``group_distributions(wave_dir, attributes=None, questions=None) -> dict[str, GroupDistribution]``
    Survey-weighted answer counts per demographic group from ``<ATTR>_data.json`` /
    ``<A>_<B>_data.json``; ``attributes=None`` is the whole population (``NONE_data.json`` if
    present, else the summed groups of a single-attribute file).
``Responses``
    Individual answers, aligned arrays: ``user_ids`` [U] (QKEY as str), ``demographics`` (DataFrame,
    one text column per attribute, NaN when unknown), ``question_keys`` [Q], ``questions``
    (``Question`` per key), ``option_index`` [U, Q] int16 (index into ``Question.options``, -1 missing
    or refused), ``values`` [U, Q] float32 (scaled ordinal, NaN when missing / refused / nominal),
    ``weights`` [U] float, ``refusal_index`` [U, Q] int8 (index into ``Question.refusals``, -1 if
    not a refusal). Helpers: ``observed``, ``split``, ``split_per_user``, ``select_users``,
    ``select_questions``, ``group_labels``, ``to_csv``.
``load_responses(csv_paths, questions, on_error="raise") -> Responses``
    The individual-level ``responses.csv`` format (``QKEY``, ``WEIGHT_W<n>``, the demographic columns
    as text, one answer-text column per question key, NaN when not asked); several files (waves)
    are merged by QKEY.

Bad input (a missing file or column, malformed literals, an answer text that is not among a
question's options) raises a ``ValueError``/``FileNotFoundError`` naming the file and key with
``on_error="raise"``; with ``on_error="skip"`` the offending entry is dropped and counted in the
returned object's ``stats``.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from steer.errors import InputFileNotFoundError, InputKeyError, UserInputError
from steer.io import atomic_write

logger = logging.getLogger(__name__)

DEMOGRAPHIC_COLUMNS: tuple[str, ...] = (
    "CREGION",
    "AGE",
    "SEX",
    "EDUCATION",
    "CITIZEN",
    "MARITAL",
    "RELIG",
    "RELIGATTEND",
    "POLPARTY",
    "INCOME",
    "POLIDEOLOGY",
    "RACE",
)
WAVE_PREFIX = "American_Trends_Panel_"
_SKIP_KEYS = ("MC_options", "question_text", "marginals")
_WAVE_RE = re.compile(r"_(W\d+)$")


def _normalise(text: object) -> str:
    return " ".join(str(text).split()).casefold()


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


# ----------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class Question:
    """A survey question with its options in ordinal order (see the module docstring)."""

    key: str
    text: str
    options: tuple[str, ...]
    ordinals: tuple[float, ...]
    scaled: tuple[float, ...] | None
    refusals: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    mapping: dict = field(default_factory=dict, compare=False)

    @property
    def wave(self) -> str | None:
        """``"W26"`` for ``SAFECRIME_W26``; ``None`` when the key carries no wave suffix."""
        match = _WAVE_RE.search(self.key)
        return match.group(1) if match else None

    @property
    def is_nominal(self) -> bool:
        return self.scaled is None

    @property
    def num_options(self) -> int:
        return len(self.options)

    @property
    def all_options(self) -> tuple[str, ...]:
        """Non-refusal options (ordinal order) followed by the refusal options."""
        return self.options + self.refusals

    def scaled_array(self) -> np.ndarray:
        """Scaled value per option as float32 (all NaN for a nominal question)."""
        if self.scaled is None:
            return np.full(len(self.options), np.nan, dtype=np.float32)
        return np.asarray(self.scaled, dtype=np.float32)

    def lookup(self) -> dict[str, int]:
        """Normalised option text -> position in ``all_options`` (exact, then case/space-insensitive).

        The release has a few case typos between files (``"noR worse"`` in W42), so matching
        falls back to a whitespace-collapsed, case-folded comparison.
        """
        table = {_normalise(t): i for i, t in reversed(list(enumerate(self.all_options)))}
        table.update({t: i for i, t in reversed(list(enumerate(self.all_options)))})
        return table

    def option_index(self, text: str) -> int:
        """Index of ``text`` in ``options``; -1 for a refusal option; ``KeyError`` otherwise."""
        table = self.lookup()
        position = table.get(str(text).strip(), table.get(_normalise(text)))
        if position is None:
            raise KeyError(f"{text!r} is not an option of {self.key} (options: {list(self.all_options)})")
        return position if position < self.num_options else -1

    @classmethod
    def from_lists(
        cls,
        key: str,
        text: str,
        references: Sequence[str],
        option_ordinal: Sequence[float],
        mapping: dict | None = None,
    ) -> Question:
        """Build from info.csv's ``references`` (refusals last) and ``option_ordinal`` lists."""
        references = tuple(str(r) for r in references)
        ordinals = [float(o) for o in option_ordinal]
        if len(ordinals) == 0:
            raise ValueError(f"{key}: option_ordinal is empty")
        if len(ordinals) > len(references):
            raise ValueError(
                f"{key}: {len(ordinals)} ordinals for {len(references)} references ({list(references)})"
            )
        if any(math.isnan(o) or math.isinf(o) for o in ordinals):
            raise ValueError(f"{key}: non-finite ordinal in {ordinals}")
        if len(set(references)) != len(references):
            raise ValueError(f"{key}: duplicate option texts in {list(references)}")
        order = sorted(range(len(ordinals)), key=lambda i: ordinals[i])  # stable for ties
        options = tuple(references[i] for i in order)
        sorted_ords = tuple(ordinals[i] for i in order)
        low, high = sorted_ords[0], sorted_ords[-1]
        scaled = None if high == low else tuple((o - low) / (high - low) for o in sorted_ords)
        return cls(
            key=key,
            text=str(text),
            options=options,
            ordinals=sorted_ords,
            scaled=scaled,
            refusals=references[len(ordinals) :],
            references=references,
            mapping=dict(mapping or {}),
        )


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` with one-line errors naming the file (empty, not CSV, not text)."""
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError as err:
        raise UserInputError(f"{path}: the file is empty") from err
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserInputError(f"{path}: cannot read the file as CSV ({first})") from err


def _literal(value: object, path: Path, key: str, column: str) -> object:
    if not isinstance(value, str):
        raise UserInputError(f"{path}: column {column!r} of {key} is empty or not a literal ({value!r})")
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError) as err:
        raise UserInputError(f"{path}: cannot parse column {column!r} of {key}: {value[:80]!r}") from err


def load_wave(path: str | os.PathLike, *, on_error: str = "raise") -> dict[str, Question]:
    """Questions of one wave's ``info.csv`` (``path``: the wave directory or the csv itself)."""
    _check_on_error(on_error)
    path = Path(path)
    csv = path / "info.csv" if path.is_dir() else path
    if not csv.is_file():
        raise InputFileNotFoundError(f"OpinionQA question file not found: {csv}")
    frame = _read_csv(csv)
    for column in ("key", "question", "references", "option_ordinal"):
        if column not in frame.columns:
            raise UserInputError(f"{csv}: missing column {column!r} (has {list(frame.columns)})")
    questions: dict[str, Question] = {}
    skipped = duplicates = 0
    for row in frame.itertuples(index=False):
        key = str(row.key)
        try:
            references = _literal(row.references, csv, key, "references")
            ordinals = _literal(row.option_ordinal, csv, key, "option_ordinal")
            mapping = (
                _literal(row.option_mapping, csv, key, "option_mapping") if "option_mapping" in frame else {}
            )
            if not isinstance(references, (list, tuple)) or not isinstance(ordinals, (list, tuple)):
                raise UserInputError(f"{csv}: references/option_ordinal of {key} are not lists")
            question = Question.from_lists(key, row.question, references, ordinals, mapping)
            if key in questions:
                # the release repeats a few keys with piped texts (IDIMPORT_W43: "being white/black/...")
                # for one data column; keep the first text, reject rows whose options differ
                if (questions[key].references, questions[key].ordinals) != (
                    question.references,
                    question.ordinals,
                ):
                    raise UserInputError(f"{csv}: duplicate question key {key} with different options")
                duplicates += 1
                continue
            questions[key] = question
        except ValueError as err:
            if on_error == "raise":
                if str(csv) in str(err):
                    raise
                raise UserInputError(f"{csv}: {err}") from err
            skipped += 1
            logger.warning("skipping question %s of %s: %s", key, csv, err)
    nominal = sum(q.is_nominal for q in questions.values())
    if nominal:
        logger.info(
            "%s: %d nominal question(s) (all-equal ordinals) excluded from ordinal scaling", csv, nominal
        )
    if duplicates:
        logger.info(
            "%s: %d repeated key row(s) (same options, piped text) merged into the first", csv, duplicates
        )
    if skipped:
        logger.warning("%s: skipped %d malformed question(s)", csv, skipped)
    return questions


def wave_dirs(root: str | os.PathLike | None = None, waves: Iterable[int | str] | None = None) -> list[Path]:
    """The ``American_Trends_Panel_W*`` directories under ``root`` (default: ``steer.data.opinionqa_dir()``)."""
    if root is None:
        from steer.data import opinionqa_dir

        root = opinionqa_dir()
    root = Path(root)
    if waves is None:
        dirs = sorted(
            (d for d in root.glob(f"{WAVE_PREFIX}W*") if d.is_dir()),
            key=lambda d: int(d.name.rsplit("W", 1)[1]),
        )
        if not dirs:
            raise InputFileNotFoundError(f"no {WAVE_PREFIX}W* directories under {root}")
        return dirs
    dirs = []
    for wave in waves:
        name = str(wave)
        if not name.startswith(WAVE_PREFIX):
            name = WAVE_PREFIX + (name if name.upper().startswith("W") else f"W{name}")
        directory = root / name
        if not directory.is_dir():
            raise InputFileNotFoundError(f"wave directory not found: {directory}")
        dirs.append(directory)
    return dirs


def load_waves(
    root: str | os.PathLike | None = None,
    waves: Iterable[int | str] | None = None,
    *,
    on_error: str = "raise",
) -> dict[str, Question]:
    """Questions of several waves, in wave order (keys carry the wave suffix, so they never clash)."""
    questions: dict[str, Question] = {}
    for directory in wave_dirs(root, waves):
        for key, question in load_wave(directory, on_error=on_error).items():
            if key in questions:
                raise UserInputError(f"{directory}: question key {key} already loaded from another wave")
            questions[key] = question
    return questions


def load_metadata(wave_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Demographic attributes of a wave's ``metadata.csv`` and their options."""
    path = Path(wave_dir)
    csv = path / "metadata.csv" if path.is_dir() else path
    if not csv.is_file():
        raise InputFileNotFoundError(f"OpinionQA metadata file not found: {csv}")
    frame = _read_csv(csv)
    for column in ("key", "options"):
        if column not in frame.columns:
            raise UserInputError(f"{csv}: missing column {column!r} (has {list(frame.columns)})")
    out = {}
    for row in frame.itertuples(index=False):
        options = _literal(row.options, csv, str(row.key), "options")
        out[str(row.key)] = [str(o) for o in options]
    return out


# ------------------------------------------------------------------------------- group distributions
@dataclass
class GroupDistribution:
    """Survey-weighted answer counts of one question per demographic group.

    ``counts[g]`` follows ``question.all_options`` (ordinal options, then refusals).
    """

    question: Question
    attributes: tuple[str, ...]
    groups: list[tuple[str, ...]]
    counts: np.ndarray  # float64 [G, n_options + n_refusals]

    @property
    def sizes(self) -> np.ndarray:
        """Total (weighted) respondents per group."""
        return self.counts.sum(1)

    @property
    def probs(self) -> np.ndarray:
        """P(option | group) over the non-refusal options [G, n_options]; NaN rows for empty groups."""
        answered = self.counts[:, : self.question.num_options]
        total = answered.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, answered / np.where(total > 0, total, 1.0), np.nan)

    @property
    def refusal_rate(self) -> np.ndarray:
        """Share of refusal-type answers per group [G] (NaN for empty groups)."""
        total = self.sizes
        refused = self.counts[:, self.question.num_options :].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, refused / np.where(total > 0, total, 1.0), np.nan)

    def group_index(self, group: str | tuple[str, ...]) -> int:
        group = (group,) if isinstance(group, str) else tuple(group)
        try:
            return self.groups.index(group)
        except ValueError:
            raise KeyError(f"{self.question.key}: no group {group} for {self.attributes}") from None

    def population(self) -> np.ndarray:
        """P(option) over the non-refusal options for all groups together."""
        answered = self.counts[:, : self.question.num_options].sum(0)
        return answered / answered.sum() if answered.sum() > 0 else np.full_like(answered, np.nan)


def _leaves(node: dict, depth: int, prefix: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], dict]]:
    """Yield (group tuple, {option: count}) down to ``depth`` nesting levels, skipping metadata keys."""
    if depth == 0:
        yield prefix, node
        return
    for name, child in node.items():
        if name in _SKIP_KEYS:
            continue
        if not isinstance(child, dict):
            raise ValueError(f"group {prefix + (name,)} is not a mapping")
        yield from _leaves(child, depth - 1, prefix + (str(name),))


def _flat_counts(node: dict) -> Iterable[tuple[str, float]]:
    for name, child in node.items():
        if name in _SKIP_KEYS:
            continue
        if isinstance(child, dict):
            yield from _flat_counts(child)
        else:
            yield str(name), float(child)


def _group_file(wave_dir: Path, attributes: tuple[str, ...]) -> tuple[Path, bool]:
    """The json file for ``attributes`` and whether its nesting is reversed w.r.t. ``attributes``."""
    if not attributes:
        path = wave_dir / "NONE_data.json"
        return path, False
    name = "_".join(attributes)
    path = wave_dir / f"{name}_data.json"
    if path.is_file():
        return path, False
    if len(attributes) == 2:
        reverse = wave_dir / f"{attributes[1]}_{attributes[0]}_data.json"
        if reverse.is_file():
            return reverse, True
        raise InputFileNotFoundError(f"group counts not found: {path} (nor {reverse.name})")
    raise InputFileNotFoundError(f"group counts not found: {path}")


def available_groupings(wave_dir: str | os.PathLike) -> list[tuple[str, ...]]:
    """The attribute tuples with a ``*_data.json`` file in ``wave_dir`` (``()`` for NONE_data.json)."""
    out = []
    for path in sorted(Path(wave_dir).glob("*_data.json")):
        name = path.name[: -len("_data.json")]
        out.append(() if name == "NONE" else tuple(name.split("_")))
    return out


def group_distributions(
    wave_dir: str | os.PathLike,
    attributes: str | Sequence[str] | None = None,
    *,
    questions: dict[str, Question] | None = None,
    on_error: str = "raise",
) -> dict[str, GroupDistribution]:
    """Per-question answer counts per group of ``attributes`` (one attribute, a pair, or ``None``).

    Uses ``<ATTR>_data.json`` / ``<A>_<B>_data.json`` (either order); ``None`` gives one group ``()``
    (the population) from ``NONE_data.json``, or, where that file is absent, the summed groups of
    ``POLPARTY_data.json``. Option texts are matched against ``info.csv`` (the json ``MC_options`` lists
    are not used: they are split at commas in the release). Counts for an option text that is not
    among the question's options raise (``on_error="raise"``) or are dropped and counted in the log.
    """
    _check_on_error(on_error)
    wave_dir = Path(wave_dir)
    attrs: tuple[str, ...] = (
        () if attributes is None else ((attributes,) if isinstance(attributes, str) else tuple(attributes))
    )
    if len(attrs) > 2:
        raise ValueError(f"at most two attributes, got {attrs}")
    questions = load_wave(wave_dir) if questions is None else questions
    path, reversed_order = _group_file(wave_dir, attrs)
    population = not attrs
    if population and not path.is_file():
        path = wave_dir / "POLPARTY_data.json"
        if not path.is_file():
            raise InputFileNotFoundError(
                f"population counts not found: {wave_dir / 'NONE_data.json'} (nor {path.name})"
            )
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserInputError(f"{path}: invalid json ({err})") from err
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a JSON object of question keys, got a {type(data).__name__}")
    out: dict[str, GroupDistribution] = {}
    dropped = 0
    for key, entry in data.items():
        question = questions.get(key)
        if question is None:
            if on_error == "raise":
                raise InputKeyError(f"{path}: question {key} is not in the wave's info.csv")
            dropped += 1
            continue
        index = question.lookup()
        try:
            if population:
                summed: dict[str, float] = {}
                for text, count in _flat_counts(entry):
                    summed[text] = summed.get(text, 0.0) + count
                leaves = [((), summed)]
            else:
                leaves = list(_leaves(entry, len(attrs), ()))
        except ValueError as err:
            raise UserInputError(f"{path}: {key}: {err}") from err
        groups: list[tuple[str, ...]] = []
        rows: list[np.ndarray] = []
        for group, option_counts in leaves:
            row = np.zeros(len(question.all_options), dtype=np.float64)
            for text, count in option_counts.items():
                position = index.get(str(text).strip(), index.get(_normalise(text)))
                if position is None:
                    if on_error == "raise":
                        raise UserInputError(
                            f"{path}: answer {text!r} of question {key} (group {group}) is not among its "
                            f"options {list(question.all_options)}"
                        )
                    dropped += 1
                    continue
                value = float(count)
                if not math.isfinite(value) or value < 0:
                    if on_error == "raise":
                        raise UserInputError(
                            f"{path}: invalid count {count!r} for {key} / {group} / {text!r}"
                        )
                    dropped += 1
                    continue
                row[position] += value
            groups.append(group[::-1] if reversed_order else group)
            rows.append(row)
        counts = np.stack(rows) if rows else np.zeros((0, len(question.all_options)))
        out[key] = GroupDistribution(question=question, attributes=attrs, groups=groups, counts=counts)
    if dropped:
        logger.warning("%s: dropped %d entries (unknown questions, options or invalid counts)", path, dropped)
    return out


def group_shares(
    distributions: dict[str, GroupDistribution], exclude: Iterable[str] = ()
) -> dict[tuple[str, ...], float]:
    """Population share of each group: per-question group sizes normalised, averaged over questions."""
    exclude = set(exclude)
    totals: dict[tuple[str, ...], float] = {}
    n = 0
    for dist in distributions.values():
        keep = [i for i, g in enumerate(dist.groups) if not exclude.intersection(g)]
        sizes = dist.sizes[keep]
        if sizes.sum() <= 0:
            continue
        n += 1
        for i, size in zip(keep, sizes / sizes.sum()):
            totals[dist.groups[i]] = totals.get(dist.groups[i], 0.0) + float(size)
    if n == 0:
        raise ValueError("no non-empty group counts to compute shares from")
    return {g: v / n for g, v in sorted(totals.items())}


# --------------------------------------------------------------------------------------- responses
@dataclass
class Responses:
    """Individual answers as aligned arrays (see the module docstring)."""

    user_ids: np.ndarray  # [U] str
    demographics: pd.DataFrame  # [U rows] one text column per attribute
    question_keys: list[str]
    questions: dict[str, Question]
    option_index: np.ndarray  # [U, Q] int16, -1 missing / refused
    values: np.ndarray  # [U, Q] float32, NaN missing / refused / nominal
    weights: np.ndarray  # [U] float64
    refusal_index: np.ndarray | None = None  # [U, Q] int8, -1 if not a refusal
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        u, q = len(self.user_ids), len(self.question_keys)
        for name in ("option_index", "values", "refusal_index"):
            array = getattr(self, name)
            if array is not None and array.shape != (u, q):
                raise ValueError(f"Responses.{name} has shape {array.shape}, expected {(u, q)}")
        if len(self.weights) != u or len(self.demographics) != u:
            raise ValueError("Responses: weights/demographics do not match the number of users")
        missing = [k for k in self.question_keys if k not in self.questions]
        if missing:
            raise ValueError(f"Responses: no Question for keys {missing[:5]}")

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_questions(self) -> int:
        return len(self.question_keys)

    @property
    def observed(self) -> np.ndarray:
        """[U, Q] bool: an ordinal answer is present (refusals, nominal and unasked are not)."""
        return ~np.isnan(self.values)

    @property
    def answered(self) -> np.ndarray:
        """[U, Q] bool: a non-refusal option was chosen (nominal questions included)."""
        return self.option_index >= 0

    def density(self) -> float:
        return float(self.observed.mean()) if self.values.size else 0.0

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Observed (user, question, scaled value) triplets, row-major."""
        rows, cols = np.nonzero(self.observed)
        return rows, cols, self.values[rows, cols]

    def group_labels(self, attributes: str | Sequence[str]) -> np.ndarray:
        """One label per user: the attribute value, or values joined by ``" | "`` for several."""
        attrs = [attributes] if isinstance(attributes, str) else list(attributes)
        for attr in attrs:
            if attr not in self.demographics.columns:
                raise KeyError(f"no demographic column {attr!r} (have {list(self.demographics.columns)})")
        parts = self.demographics[attrs].astype(object).where(self.demographics[attrs].notna(), "nan")
        return parts.astype(str).agg(" | ".join, axis=1).to_numpy()

    def _replace(
        self, rows: np.ndarray | slice, cols: np.ndarray | slice, keep: np.ndarray | None = None
    ) -> Responses:
        option_index = self.option_index[rows][:, cols]
        values = self.values[rows][:, cols]
        refusal = None if self.refusal_index is None else self.refusal_index[rows][:, cols]
        if keep is not None:
            option_index = np.where(keep, option_index, -1).astype(np.int16)
            values = np.where(keep, values, np.nan).astype(np.float32)
            if refusal is not None:
                refusal = np.where(keep, refusal, -1).astype(np.int8)
        keys = list(np.asarray(self.question_keys, dtype=object)[cols])
        return Responses(
            user_ids=self.user_ids[rows],
            demographics=self.demographics.iloc[rows].reset_index(drop=True),
            question_keys=keys,
            questions={k: self.questions[k] for k in keys},
            option_index=np.ascontiguousarray(option_index),
            values=np.ascontiguousarray(values),
            weights=self.weights[rows],
            refusal_index=None if refusal is None else np.ascontiguousarray(refusal),
            stats=dict(self.stats),
        )

    def select_users(self, indices: Sequence[int] | np.ndarray) -> Responses:
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.nonzero(indices)[0]
        return self._replace(indices, slice(None))

    def select_questions(self, keys: Sequence[str]) -> Responses:
        position = {k: i for i, k in enumerate(self.question_keys)}
        missing = [k for k in keys if k not in position]
        if missing:
            raise KeyError(f"unknown question keys {missing[:5]}")
        return self._replace(slice(None), np.asarray([position[k] for k in keys], dtype=np.int64))

    def mask(self, keep: np.ndarray) -> Responses:
        """A copy where entries with ``keep == False`` become missing."""
        if keep.shape != self.values.shape:
            raise ValueError(f"mask shape {keep.shape} != {self.values.shape}")
        return self._replace(slice(None), slice(None), keep)

    def split(
        self, holdout: float = 0.2, *, seed: int = 0, min_train: int = 1
    ) -> tuple[Responses, Responses]:
        """Split observed entries into (train, held-out) at random; users keep >= ``min_train`` in train."""
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {holdout}")
        rng = np.random.default_rng(seed)
        observed = self.observed
        held = observed & (rng.random(observed.shape, dtype=np.float32) < holdout)
        too_few = (observed & ~held).sum(1) < min_train
        held[too_few] = False
        return self.mask(~held), self.mask(held)

    def split_per_user(self, k: int, *, seed: int = 0) -> tuple[Responses, Responses]:
        """(first, rest): ``k`` random observed answers per user (all if fewer), and the remaining ones."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        rng = np.random.default_rng(seed)
        observed = self.observed
        scores = np.where(observed, rng.random(observed.shape, dtype=np.float32), np.float32(np.inf))
        ranks = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1, kind="stable")
        first = observed & (ranks < k)
        return self.mask(first), self.mask(observed & ~first)

    def to_csv(self, path: str | os.PathLike, *, wave: str | None = None) -> Path:
        """Write the real individual-level ``responses.csv`` format (atomically).

        Columns: ``QKEY``, ``WEIGHT_<wave>`` (``wave`` defaults to the first question's wave, else
        ``W0``), the demographic columns, then one answer-text column per question (refusals written
        as their refusal text, missing as empty).
        """
        path = Path(path)
        wave = wave or next(
            (self.questions[k].wave for k in self.question_keys if self.questions[k].wave), "W0"
        )
        columns: dict[str, object] = {"QKEY": self.user_ids, f"WEIGHT_{wave}": self.weights}
        for attr in DEMOGRAPHIC_COLUMNS:
            columns[attr] = self.demographics[attr].to_numpy() if attr in self.demographics else np.nan
        for attr in self.demographics.columns:
            if attr not in columns:
                columns[attr] = self.demographics[attr].to_numpy()
        for j, key in enumerate(self.question_keys):
            question = self.questions[key]
            table = np.asarray(list(question.options) + list(question.refusals) + [None], dtype=object)
            index = self.option_index[:, j].astype(np.int64)
            code = np.where(index >= 0, index, len(table) - 1)
            if self.refusal_index is not None:
                refused = self.refusal_index[:, j].astype(np.int64)
                code = np.where(refused >= 0, question.num_options + refused, code)
            columns[key] = table[code]
        frame = pd.DataFrame(columns)
        return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def load_responses(
    csv_paths: str | os.PathLike | Sequence[str | os.PathLike],
    questions: dict[str, Question],
    *,
    on_error: str = "raise",
    demographic_columns: Sequence[str] = DEMOGRAPHIC_COLUMNS,
) -> Responses:
    """Read individual-level ``responses.csv`` files (one per wave) and merge them by ``QKEY``.

    Question columns are those of ``questions`` present in at least one file (other columns are
    ignored). ``weights`` is the first non-missing ``WEIGHT_W*`` across files (1.0 when none);
    demographics come from the first file that has a value. ``stats`` counts ``unknown_answers``,
    ``refusals``, ``missing_columns`` and ``duplicate_qkeys`` (the latter two only with "skip").
    """
    _check_on_error(on_error)
    paths = [Path(csv_paths)] if isinstance(csv_paths, (str, os.PathLike)) else [Path(p) for p in csv_paths]
    if not paths:
        raise ValueError("load_responses: no csv paths given")
    stats = {"unknown_answers": 0, "refusals": 0, "missing_columns": 0, "duplicate_qkeys": 0}
    frames = []
    for path in paths:
        if not path.is_file():
            raise InputFileNotFoundError(f"responses file not found: {path}")
        frame = _read_csv(path, dtype=str, keep_default_na=True)
        if "QKEY" not in frame.columns:
            raise UserInputError(f"{path}: missing column 'QKEY' (has {list(frame.columns)[:20]})")
        frame["QKEY"] = frame["QKEY"].str.strip()
        if frame["QKEY"].isna().any():
            raise UserInputError(
                f"{path}: empty QKEY in row(s) {list(np.nonzero(frame['QKEY'].isna().to_numpy())[0][:5])}"
            )
        dupes = frame["QKEY"].duplicated()
        if dupes.any():
            if on_error == "raise":
                raise UserInputError(f"{path}: duplicate QKEY {frame['QKEY'][dupes].iloc[0]!r}")
            stats["duplicate_qkeys"] += int(dupes.sum())
            frame = frame[~dupes]
        weight_columns = [c for c in frame.columns if c.startswith("WEIGHT_W")]
        if not weight_columns:
            if on_error == "raise":
                raise UserInputError(f"{path}: missing column 'WEIGHT_W<n>'")
            stats["missing_columns"] += 1
        for column in demographic_columns:
            if column not in frame.columns:
                if on_error == "raise":
                    raise UserInputError(f"{path}: missing demographic column {column!r}")
                stats["missing_columns"] += 1
        frames.append((path, frame.set_index("QKEY"), weight_columns))

    user_ids = list(dict.fromkeys(q for _, frame, _ in frames for q in frame.index))
    user_index = pd.Index(user_ids)
    question_keys = [k for k in questions if any(k in frame.columns for _, frame, _ in frames)]
    column_of = {k: j for j, k in enumerate(question_keys)}
    u, q = len(user_ids), len(question_keys)
    option_index = np.full((u, q), -1, dtype=np.int16)
    values = np.full((u, q), np.nan, dtype=np.float32)
    refusal_index = np.full((u, q), -1, dtype=np.int8)
    weights = np.full(u, np.nan)
    demographics = pd.DataFrame(index=range(u), columns=list(demographic_columns), dtype=object)

    for path, frame, weight_columns in frames:
        rows = user_index.get_indexer(frame.index)
        for column in weight_columns:
            w = pd.to_numeric(frame[column], errors="coerce").to_numpy()
            fill = np.isnan(weights[rows]) & ~np.isnan(w)
            weights[rows[fill]] = w[fill]
        for column in demographic_columns:
            if column in frame.columns:
                current = demographics[column].to_numpy(dtype=object, copy=True)
                incoming = frame[column].to_numpy(dtype=object)
                fill = pd.isna(current[rows]) & ~pd.isna(incoming)
                current[rows[fill]] = incoming[fill]
                demographics[column] = current
        for key in question_keys:
            if key not in frame.columns:
                continue
            question = questions[key]
            j = column_of[key]
            answers = frame[key]
            present = answers.notna().to_numpy()
            texts = answers[present].str.strip()
            lookup = question.lookup()
            positions = {t: lookup.get(t, lookup.get(_normalise(t), -1)) for t in texts.unique()}
            position = texts.map(positions).to_numpy(dtype=np.int64)
            n_opt = question.num_options
            codes = np.where((position >= 0) & (position < n_opt), position, np.nan)
            refusal_codes = np.where(position >= n_opt, position - n_opt, np.nan)
            unknown = position < 0
            if unknown.any():
                if on_error == "raise":
                    bad = texts[unknown]
                    raise ValueError(
                        f"{path}: answer {bad.iloc[0]!r} to question {key} (QKEY {bad.index[0]}) is not among "
                        f"its options {list(question.all_options)}"
                    )
                stats["unknown_answers"] += int(unknown.sum())
            target = rows[present]
            ok = ~np.isnan(codes)
            option_index[target[ok], j] = codes[ok].astype(np.int16)
            if not question.is_nominal:
                values[target[ok], j] = question.scaled_array()[codes[ok].astype(np.int64)]
            ref = ~np.isnan(refusal_codes)
            refusal_index[target[ref], j] = refusal_codes[ref].astype(np.int8)
            stats["refusals"] += int(ref.sum())
    weights = np.where(np.isnan(weights), 1.0, weights)
    return Responses(
        user_ids=np.asarray(user_ids, dtype=object).astype(str),
        demographics=demographics,
        question_keys=question_keys,
        questions={k: questions[k] for k in question_keys},
        option_index=option_index,
        values=values,
        weights=weights,
        refusal_index=refusal_index,
        stats=stats,
    )
