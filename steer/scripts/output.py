"""Output directories of training runs: never mix two runs, resolve resume paths before the model loads.

A training run refuses an ``output_dir`` that already holds another run's artefacts (a saved model or adapter,
``guidance/``, ``persona/``, ``data/``, ``checkpoint-*``) unless ``overwrite_output_dir`` is set or it resumes
from a checkpoint inside that directory. Both recipe runners (``steer train constrained|persona``) call
:func:`check_output_dir` and :func:`resolve_resume` before anything slow happens.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from steer.errors import InputFileNotFoundError, UserInputError

__all__ = ["RUN_ARTEFACTS", "check_output_dir", "last_checkpoint", "previous_run_artefacts", "resolve_resume"]

# What a finished or interrupted run leaves in its output_dir (transformers/PEFT files and steer's own).
RUN_ARTEFACTS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "config.json",
    "training_args.bin",
    "trainer_state.json",
    "guidance",
    "persona",
    "data",
)
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
