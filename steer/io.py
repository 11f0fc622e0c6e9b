"""Atomic file and directory writes: the one home for them in steer; and configs read back from saved dicts.

Every artefact is written to a temporary sibling and renamed into place (``os.replace``), so a crash or
a failed write never leaves a half-written file where a reader expects a whole one. A config saved as a
dict (``to_dict``) is built again with :func:`dataclass_from_dict`, which names any key the config lacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "atomic_dir",
    "check_writable_dir",
    "atomic_save_file",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "dataclass_from_dict",
]

T = TypeVar("T")


def _umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open(path, "w")`` (or ``mkdir``) would give a new file (directory); ``mkstemp`` makes
    files 0600 and ``mkdtemp`` directories 0700."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The parent directory is created; the file gets the usual mode (umask applied), and the temporary
    file is removed if ``write`` fails, so ``path`` holds either its old content or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text`` written atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, payload) -> Path:
    """``payload`` as indented JSON (plus a final newline), written atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def atomic_save_file(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` written atomically (tensors detached, contiguous, on the CPU)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` written atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory with ``write(tmp_dir)``, then swap it in for ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode(directory=True))
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_writable_dir(directory: str | os.PathLike, *, what: str) -> Path:
    """Create ``directory`` if needed and check a file can be written in it, before an expensive step whose
    result would otherwise be lost; one :class:`~steer.errors.UserInputError` naming ``what`` otherwise."""
    from steer.errors import UserInputError

    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserInputError(f"{what} {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserInputError(f"{what} {directory} is not writable ({err.strerror or err})") from err
    return directory


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls(**data)`` for the dataclass ``cls``; keys that are not its fields are refused in one line,
    ``unknown <class> keys [...]; known: [...]``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    return cls(**data)
