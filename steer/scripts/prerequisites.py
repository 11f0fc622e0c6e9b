"""A recipe's prerequisite runs (``ConstrainedScriptArguments.prerequisites``): runs of the same command, each with
its own overrides and ``output_dir``, that must have finished before the recipe's own run can start (the adapters
its ``kl_reference_adapter`` or ``policy_init_adapter`` name, for instance).

The CLI (:mod:`steer.cli.dispatch`) trains, in order, each one whose ``output_dir`` holds no finished run yet
(:func:`finished_run`), with :func:`prerequisite_argv` — the recipe's own arguments, then the overrides — and
resumes one that left a checkpoint. One command then runs the whole recipe, and running it again redoes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steer.scripts.output import last_checkpoint

__all__ = ["finished_run", "prerequisite_argv", "prerequisite_runs"]

_SET_BY_STEER = ("prerequisites", "resume_from_checkpoint")


def prerequisite_runs(value: Sequence[Mapping[str, Any]] | str | None, field: str) -> list[dict[str, Any]]:
    """The prerequisite runs as a config field holds them — a list of mappings (a recipe's YAML), its JSON (the
    command line), or None/"" (none) — checked: each a mapping with a non-empty ``output_dir``, no None value,
    no key steer sets itself. ``ValueError`` naming ``field`` and the entry otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"{field} is not valid JSON: {err}") from err
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ValueError(f"{field} must be a list of mappings (one per run), got {type(value).__name__}")
    runs = []
    for index, run in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(run, Mapping):
            raise ValueError(f"{where} must be a mapping of overrides, got {type(run).__name__}")
        output_dir = run.get("output_dir")
        if not isinstance(output_dir, str) or not output_dir.strip():
            raise ValueError(f"{where} needs its own output_dir (a non-empty path), got {output_dir!r}")
        for key, item in run.items():
            if key in _SET_BY_STEER:
                raise ValueError(f"{where}.{key}: set by steer for a prerequisite run, leave it out")
            if item is None:
                raise ValueError(f"{where}.{key} is null; give a value or leave the key out")
        runs.append(dict(run))
    outputs = [run["output_dir"] for run in runs]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"{field}: two runs share an output_dir ({outputs})")
    return runs


def finished_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a finished run's model: an adapter (``adapter_config.json``) or a full model
    (``config.json``). A directory with checkpoints only is an interrupted run."""
    path = Path(output_dir).expanduser()
    return (path / "adapter_config.json").is_file() or (path / "config.json").is_file()


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value)
    return str(value)


def prerequisite_argv(args: Sequence[str], run: Mapping[str, Any]) -> list[str]:
    """The command-line arguments of the prerequisite ``run``: the recipe's own ``args`` (its ``--config`` and
    overrides), then the run's overrides (the later flag wins), resuming from its newest checkpoint when it has
    one, and without prerequisites of its own."""
    argv = list(args)
    for key, value in run.items():
        if isinstance(value, (list, tuple)) and not key.endswith("_kwargs"):
            argv += [f"--{key}", *(_flag_value(item) for item in value)]
        else:
            argv += [f"--{key}", _flag_value(value)]
    resume = "latest" if last_checkpoint(Path(run["output_dir"]).expanduser()) is not None else ""
    return [*argv, "--resume_from_checkpoint", resume, "--prerequisites", "[]"]
