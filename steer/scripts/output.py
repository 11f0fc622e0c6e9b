"""Output directories of training runs: never mix two runs, resolve resume paths before the model loads.

A training run refuses an ``output_dir`` that already holds another run's artefacts (a saved model or adapter,
``guidance/``, ``persona/``, ``data/``, ``checkpoint-*``) unless ``overwrite_output_dir`` is set or it resumes
from a checkpoint inside that directory. Both recipe runners (``steer train constrained|persona``) call
:func:`check_output_dir` and :func:`resolve_resume` before anything slow happens.

``overwrite_output_dir`` means the directory ends up holding the new run's artefacts only: just before training
starts, :func:`replacing_previous_run` moves every artefact of the previous run (:data:`RUN_ARTEFACTS`, their
companions :data:`RUN_COMPANIONS`, ``checkpoint-*``, model shards) into ``output_dir/.replaced-run``, and removes
that once the new run has finished. A run that fails or is interrupted before writing anything gets the previous
run moved back; one that wrote checkpoints keeps them (they resume) and leaves the previous run in
``.replaced-run`` (never read by steer: not a checkpoint, not an adapter, not ``guidance/``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from steer.errors import InputFileNotFoundError, RunInterrupted, UserInputError
from steer.interpolation import TRAINED_POLICY_DIR

__all__ = [
    "REPLACED_DIR",
    "Replacement",
    "RUN_ARTEFACTS",
    "RUN_COMPANIONS",
    "check_output_dir",
    "last_checkpoint",
    "previous_run_artefacts",
    "replacing_previous_run",
    "resolve_resume",
    "resume_hint",
    "run_entries",
    "training_run",
]

logger = logging.getLogger(__name__)

# What a finished or interrupted run leaves in its output_dir (transformers/PEFT files and steer's own); any of
# them (or a checkpoint-*) means the directory holds a previous run.
RUN_ARTEFACTS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "training_args.bin",
    "trainer_state.json",
    "base_model.json",
    "metrics.jsonl",
    "training_curves.png",
    "guidance",
    "persona",
    "data",
    TRAINED_POLICY_DIR,
)
# Files that come with those artefacts (tokenizer, model card, results, logs, evaluation outputs): moved aside
# with a previous run on overwrite, but on their own not a previous run.
RUN_COMPANIONS = (
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "runs",
    "eval",
)
_SHARDS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin", "toxicity_report.*", "*.generations.jsonl")
REPLACED_DIR = ".replaced-run"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LATEST = ("true", "latest", "last")


def previous_run_artefacts(output_dir: str | os.PathLike) -> list[str]:
    """The names in ``output_dir`` that a previous training run wrote (empty when there is none)."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    found = [name for name in RUN_ARTEFACTS if (path / name).exists()]
    found += sorted(p.name for p in path.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name))
    return found


def run_entries(output_dir: str | os.PathLike) -> list[str]:
    """Every name in ``output_dir`` that belongs to a training run: artefacts, companions, shards, checkpoints."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    names = [name for name in (*RUN_ARTEFACTS, *RUN_COMPANIONS) if (path / name).exists()]
    for pattern in _SHARDS:
        names += sorted(p.name for p in path.glob(pattern) if p.name not in names)
    names += sorted(p.name for p in path.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name))
    return names


@dataclass
class Replacement:
    """What :func:`replacing_previous_run` did: the previous run's names it moved aside, and whether it put
    them back (the new run stopped before writing anything)."""

    moved: list[str] = field(default_factory=list)
    restored: bool = False


@contextlib.contextmanager
def replacing_previous_run(
    output_dir: str | os.PathLike, *, overwrite: bool, resume: str | None, is_main: bool = True
) -> Iterator[list[str]]:
    """Around training and saving: with ``overwrite``, the previous run's artefacts make way for the new run's.

    On entry (main process only; nothing happens without ``overwrite``, when resuming, or when ``output_dir``
    holds no previous run) every :func:`run_entries` name moves into ``output_dir/.replaced-run``. On a normal
    exit that directory is removed. On an exception (Ctrl-C included) the previous run is moved back when the
    new run wrote nothing; otherwise the new run's checkpoints stay and the previous run stays in
    ``.replaced-run``, as the log says. Yields a :class:`Replacement` (what was moved, whether it came back).
    """
    path = Path(output_dir)
    replacement = Replacement()
    if not overwrite or resume is not None or not is_main or not previous_run_artefacts(path):
        yield replacement
        return
    stash = path / REPLACED_DIR
    if stash.exists():  # left by an earlier replaced run that stopped: older than what is in output_dir now
        shutil.rmtree(stash)
    stash.mkdir()
    moved = replacement.moved = run_entries(path)
    for name in moved:
        os.replace(path / name, stash / name)
    logger.info(
        "output_dir %s: overwrite_output_dir moved the previous run's %d entries (%s) aside; they are deleted "
        "once this run has saved",
        path,
        len(moved),
        ", ".join(moved[:6]) + (", ..." if len(moved) > 6 else ""),
    )
    try:
        yield replacement
    except BaseException:
        written = run_entries(path)
        if not written:
            for name in moved:
                os.replace(stash / name, path / name)
            shutil.rmtree(stash, ignore_errors=True)
            replacement.restored = True
            logger.warning("output_dir %s: this run wrote nothing; the previous run was put back", path)
        else:
            logger.warning(
                "output_dir %s: this run stopped after writing %s; the previous run it replaces is kept in %s "
                "(delete it, or move its files back by hand)",
                path,
                ", ".join(written[:4]),
                stash,
            )
        raise
    shutil.rmtree(stash, ignore_errors=True)


def resume_hint(output_dir: str | os.PathLike) -> str:
    """How to continue a run that stopped: the resume flag and its newest checkpoint, or that there is none."""
    found = last_checkpoint(output_dir)
    if found is None:
        return f"no checkpoint was written to {output_dir} (save_strategy / save_steps), so run it again from the start"
    return f"resume with --resume_from_checkpoint latest (newest: {found})"


@contextlib.contextmanager
def training_run(
    output_dir: str | os.PathLike, *, overwrite: bool, resume: str | None, is_main: bool = True
) -> Iterator[None]:
    """Around a run's training and saving: :func:`replacing_previous_run`, and Ctrl-C as a
    :class:`~steer.errors.RunInterrupted` whose message says how to resume."""
    replacement = Replacement()
    try:
        with replacing_previous_run(
            output_dir, overwrite=overwrite, resume=resume, is_main=is_main
        ) as replacement:
            yield
    except RunInterrupted:
        raise
    except KeyboardInterrupt as err:
        if replacement.restored:  # the run wrote nothing: the checkpoints there are the previous run's
            hint = f"it wrote no checkpoint, and the previous run in {output_dir} was put back"
        else:
            hint = resume_hint(output_dir)
        raise RunInterrupted(f"training interrupted; {hint}") from err


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-<step>`` directory of ``output_dir`` with the highest step, or None."""
    path = Path(output_dir)
    if not path.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return max(steps)[1] if steps else None


def resolve_resume(
    resume: str | bool | None,
    output_dir: str | os.PathLike,
    *,
    owner: str,
    state_files: tuple[str, ...] = (),
) -> str | None:
    """``resume_from_checkpoint`` as a checked checkpoint path (or None).

    ``True`` / ``"true"`` / ``"latest"`` mean the newest ``checkpoint-*`` of ``output_dir``. The checkpoint
    must hold ``trainer_state.json`` and, when given, one of ``state_files`` (glob patterns: the trainer's
    own state). ``owner`` names the config class in messages.
    """
    if resume is None or resume is False or (isinstance(resume, str) and not resume.strip()):
        return None
    field = f"{owner}.resume_from_checkpoint"
    if resume is True or (isinstance(resume, str) and resume.strip().lower() in _LATEST):
        found = last_checkpoint(output_dir)
        if found is None:
            raise InputFileNotFoundError(
                f"{field}={resume!r}: no checkpoint-* directory in output_dir {output_dir} to resume from"
            )
        path = found
    else:
        path = Path(str(resume)).expanduser()
        if not path.is_dir():
            raise InputFileNotFoundError(f"{field}: checkpoint directory not found: {path}")
    if not (path / "trainer_state.json").is_file():
        raise InputFileNotFoundError(
            f"{field}: {path} is not a complete Trainer checkpoint (no trainer_state.json)"
        )
    if state_files and not any(any(path.glob(pattern)) for pattern in state_files):
        raise InputFileNotFoundError(
            f"{field}: {path} lacks {' / '.join(state_files)} (not written by this trainer, or incomplete)"
        )
    return str(path)


def check_output_dir(
    output_dir: str | os.PathLike | None,
    *,
    overwrite: bool,
    resume: str | None,
    owner: str,
) -> None:
    """Refuse an ``output_dir`` holding another run's artefacts (one line naming them and the way out).

    Allowed: a new or empty directory, ``overwrite`` (``--overwrite_output_dir``), or resuming from a
    checkpoint inside ``output_dir`` (``resume``: a path from :func:`resolve_resume`).
    """
    if not output_dir:
        raise UserInputError("output_dir is not set: every training run needs its own output directory")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output_dir {path} exists and is not a directory")
    if overwrite:
        return
    if resume is not None:
        try:
            Path(resume).resolve().relative_to(path.resolve())
            return
        except ValueError:
            pass
    found = previous_run_artefacts(path)
    if found:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise UserInputError(
            f"output_dir {path} already holds a previous run ({shown}); choose a new output_dir, set "
            f"{owner}.overwrite_output_dir (--overwrite_output_dir true) to replace it, or resume with "
            "--resume_from_checkpoint"
        )
