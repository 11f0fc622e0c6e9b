"""Trainers: ``ConstrainedConfig``/``ConstrainedTrainer`` (NADO guidance) and ``PersonaConfig``/``PersonaTrainer``.

Names are imported lazily (``from steer.trainers import ConstrainedTrainer`` loads only that module).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "constrained": (
        "ConstrainedConfig",
        "ConstrainedScriptArguments",
        "ConstrainedTrainer",
        "build_constraint",
        "train_constrained",
    ),
    "persona": ("PersonaConfig", "PersonaScriptArguments", "PersonaTrainer", "train_persona"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
