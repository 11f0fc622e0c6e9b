"""Atomic writes keep the modes a plain write would give (temporary files and directories are private)."""

from __future__ import annotations

import os

from steer.io import atomic_dir, atomic_write_text


def test_atomic_writes_get_the_umask_modes(tmp_path):
    mask = os.umask(0o022)
    try:
        directory = atomic_dir(tmp_path / "artefact", lambda path: (path / "weights.txt").write_text("w"))
        text = atomic_write_text(tmp_path / "report.md", "r")
    finally:
        os.umask(mask)
    assert (directory / "weights.txt").read_text() == "w" and text.read_text() == "r"
    assert os.stat(directory).st_mode & 0o777 == 0o755  # mkdtemp alone would leave 0700
    assert os.stat(text).st_mode & 0o777 == 0o644  # mkstemp alone would leave 0600
