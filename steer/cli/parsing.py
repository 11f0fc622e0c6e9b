"""Parsing a ``steer`` command's arguments: a recipe YAML (``--config``) and ``--key value`` overrides into the
command's config dataclasses with TRL's :class:`~trl.TrlParser`.

The command line wins over the YAML; unknown keys, in the YAML or on the command line, are errors that name the
key (with close matches); a recipe that is not a UTF-8 YAML mapping is one line naming the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence

from steer.cli.commands import PROG, Command, CommandLineError, load_command
from steer.cli.devices import cpu_parser_defaults


def _check_disjoint(command: Command, types: Sequence[type]) -> None:
    """Two config dataclasses of one command must not share a field name (one key would set both)."""
    owner: dict[str, str] = {}
    for cls in types:
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise CommandLineError(
                    command.name,
                    f"field {f.name!r} is defined by both {owner[f.name]} and {cls.__name__}; "
                    "rename one of them so that a recipe key sets exactly one field",
                )
            owner[f.name] = cls.__name__


def make_parser(command: Command, types: Sequence[type] | None = None):
    """The :class:`~trl.TrlParser` of one command (prefix abbreviations disabled: every key must be exact)."""
    from trl import TrlParser

    if types is None:
        _, types = load_command(command)
    _check_disjoint(command, types)
    prog = f"{PROG} {command.name}"
    parser = TrlParser(
        list(types),
        prog=prog,
        usage=f"{prog} [--config FILE.yaml] [--key value ...]",
        description=f"{command.help}. Every option below is also a key of the --config YAML; the command "
        "line wins over the YAML; an `env:` mapping in the YAML sets environment variables.",
        allow_abbrev=False,
    )
    parser.set_defaults(**cpu_parser_defaults({action.dest for action in parser._actions}))
    return parser


def _known_keys(parser) -> list[str]:
    return sorted({a.dest for a in parser._actions if a.dest not in ("help",)})


def _unknown_message(parser, strings: list[str], source: str) -> str:
    keys = [s for s in strings if s.startswith("-")] or strings
    known = _known_keys(parser)
    parts = []
    for key in keys:
        bare = key.lstrip("-").split("=", 1)[0].replace("-", "_")
        close = difflib.get_close_matches(bare, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        parts.append(f"{bare!r}{hint}")
    noun = "key" if len(parts) == 1 else "keys"
    return f"unknown {noun} {', '.join(parts)} {source}; `{parser.prog} --help` lists the valid keys"


def normalise_config_flag(args: list[str]) -> tuple[list[str], str | None]:
    """Accept ``--config=FILE`` as well as ``--config FILE``; check the file exists."""
    out, path = [], None
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--config="):
            path = token.split("=", 1)[1]
            out += ["--config", path]
        elif token == "--config":
            if i + 1 >= len(args):
                raise CommandLineError("", "--config needs a YAML file path")
            path = args[i + 1]
            out += ["--config", path]
            i += 1
        else:
            out.append(token)
        i += 1
    if out.count("--config") > 1:
        raise CommandLineError("", "--config given more than once")
    if path is not None and not os.path.isfile(path):
        raise CommandLineError("", f"config file not found: {path}")
    if path is not None:
        _check_config_file(path)
    return out, path


def _check_config_file(path: str) -> None:
    """A recipe must be a UTF-8 YAML mapping: one line naming the file, the line and the problem otherwise."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except UnicodeDecodeError as err:
        raise CommandLineError(
            "", f"config {path} is not a UTF-8 text file ({err.reason} at byte {err.start})"
        ) from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise CommandLineError("", f"config {path} is not valid YAML{where}: {detail}") from err
    except OSError as err:
        raise CommandLineError("", f"config {path} cannot be read ({err.strerror or err})") from err
    if data is not None and not isinstance(data, dict):
        raise CommandLineError(
            "", f"config {path} must be a YAML mapping of keys to values, got a {type(data).__name__}"
        )


def parse_command_args(command: Command, args: Sequence[str], types: Sequence[type] | None = None) -> tuple:
    """Parse ``[--config FILE.yaml] [--key value ...]`` into the command's dataclass instances."""
    if types is None:
        _, types = load_command(command)
    parser = make_parser(command, types)
    try:
        args, config_path = normalise_config_flag(list(args))
    except CommandLineError as err:
        raise CommandLineError(command.name, str(err)) from None
    try:
        *parsed, from_config, from_cli = parser.parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as err:  # a field's validation (__post_init__) or a malformed YAML mapping
        where = f" (config {config_path})" if config_path else ""
        raise CommandLineError(command.name, f"{err}{where}") from err
    if from_config:
        raise CommandLineError(command.name, _unknown_message(parser, from_config, f"in {config_path}"))
    if from_cli:
        raise CommandLineError(command.name, _unknown_message(parser, from_cli, "on the command line"))
    return tuple(parsed)
