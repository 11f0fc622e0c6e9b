"""Trainers: ``ConstrainedConfig``/``ConstrainedTrainer`` (NADO guidance) and ``PersonaConfig``/``PersonaTrainer``.

Names are imported lazily (``from steer.trainers import ConstrainedTrainer`` loads only that module). The
recipe runners (script arguments, data loading, ``train_*``) are a floor above, in :mod:`steer.scripts`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    ".trainers.constrained": ("ConstrainedConfig", "ConstrainedTrainer"),
    ".trainers.persona": ("PersonaConfig", "PersonaTrainer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], "steer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
