"""The constraint registry: the names that recipes (``constraint:``) and ``steer eval`` (``--oracle``) give
constraints.

One vocabulary for training and evaluation. :data:`CONSTRAINTS` maps each name to the constructor it stands
for; :func:`build_constraint` builds one from its name (or a ``package.module:Class`` path to any
:class:`~steer.constraints.Constraint` subclass) and its keyword arguments.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from ..errors import InputKeyError, UserInputError, first_line
from .base import Constraint
from .classifier import ClassifierConstraint
from .keyword import KeywordConstraint
from .topics import topic_constraint
from .toxicity import NonToxic

__all__ = ["CONSTRAINTS", "build_constraint", "constraint_kwargs"]

CONSTRAINTS: dict[str, Callable[..., Constraint]] = {
    "non_toxic": NonToxic,  # backend= "profanity" (default) or "detoxify"
    "keyword": KeywordConstraint,
    "topic": topic_constraint,  # topic= science | politics | military | religion | computers | space | legal
    "classifier": ClassifierConstraint,
    "profanity": partial(NonToxic, "profanity"),
    "detoxify": partial(NonToxic, "detoxify"),
}


def _target(factory: Callable[..., Constraint]) -> str:
    """How an error names a registry constructor: ``steer.constraints:NonToxic('detoxify')``."""
    if isinstance(factory, partial):
        return f"{_target(factory.func)}({', '.join(map(repr, factory.args))})"
    return f"{__package__}:{factory.__name__}"


def constraint_kwargs(value: Mapping[str, Any] | str | None, field: str) -> dict[str, Any]:
    """A constraint's keyword arguments as a config field holds them: a mapping (a recipe's YAML), a JSON object
    (the command line) or None/"" (none). ``ValueError`` naming ``field`` for invalid JSON or a non-mapping."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{field} is not valid JSON: {err}") from err
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be a mapping, got {type(value).__name__}")
    return dict(value)


def build_constraint(
    name: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    field: str = "constraint",
    kwargs_field: str = "constraint_kwargs",
    load_hint: str = "",
) -> Constraint:
    """The constraint named ``name`` (a key of :data:`CONSTRAINTS`, or ``package.module:Class``) built with
    ``kwargs``.

    Every failure that comes from the name or the keyword arguments is a one-line
    :class:`~steer.errors.UserInputError` naming ``field`` (the setting that holds the name) or
    ``kwargs_field`` (the one the keyword arguments come from); an unknown name is an
    :class:`~steer.errors.InputKeyError` listing the registry's names. ``load_hint`` ends the message when the
    constraint cannot load its model (``OSError``, e.g. offline).
    """
    if name in CONSTRAINTS:
        factory, target = CONSTRAINTS[name], _target(CONSTRAINTS[name])
    elif ":" in name:
        target = name
        module_name, _, class_name = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise UserInputError(f"{field}: cannot import {target!r} ({err})") from err
        if not (isinstance(factory, type) and issubclass(factory, Constraint)):
            raise UserInputError(f"{field}: {target!r} is not a steer.constraints.Constraint subclass")
    else:
        raise InputKeyError(
            f"{field}: unknown constraint {name!r}; choose one of {sorted(CONSTRAINTS)} or "
            "'package.module:Class'"
        )
    kwargs = dict(kwargs or {})
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserInputError(
            f"{kwargs_field} {json.dumps(kwargs, default=str)} rejected by {target}: {first_line(err)}"
        ) from err
    except OSError as err:  # a model the constraint needs cannot be read or downloaded (offline)
        raise UserInputError(
            f"{field}={name!r} with {kwargs_field} {json.dumps(kwargs, default=str)} could not load its "
            f"model ({type(err).__name__}: {first_line(err)}){load_hint}"
        ) from err
