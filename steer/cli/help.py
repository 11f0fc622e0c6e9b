"""The help of the ``steer`` command line: the command list, and ``steer <command> --help`` read from steer's source.

``steer <command> --help`` lists steer's own config fields with their help text without importing
torch/transformers/trl: the command's dataclasses are read with :mod:`ast` from the source of steer's modules
(their steer base classes first; fields inherited from transformers/trl are left to ``--help-all``, which
builds the full parser).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from steer.cli.commands import COMMANDS, PROG, Command


def version() -> str:
    from steer import __version__

    return __version__


def usage(prefix: tuple[str, ...] = ()) -> str:
    """``steer --help`` (or ``steer train --help``): the commands under ``prefix`` and the global options."""
    commands = [c for c in COMMANDS if c.words[: len(prefix)] == prefix]
    width = max(len(c.name) for c in commands) + 2
    lines = [
        f"usage: {PROG} {' '.join(prefix) + ' ' if prefix else ''}<command> [--config FILE.yaml] [--key value ...]",
        "",
        "Constrained (NADO-guided) and persona-steered fine-tuning.",
        "",
        "commands:",
    ]
    lines += [f"  {c.name.ljust(width)}{c.help}" for c in commands]
    lines += [
        "",
        "options:",
        "  -h, --help     show this help; `steer <command> --help` lists steer's config fields with their help,",
        "                 `steer <command> --help-all` also the inherited transformers/trl fields",
        "  --version      print the steer version",
        "  --debug        (before the command) print the traceback of a user error too; or set STEER_DEBUG=1",
        "",
        "Values come from the recipe YAML given with --config, then from --key value overrides. Multi-process:",
        "  accelerate launch --config_file accelerate_configs/ddp.yaml -m steer.cli train constrained \\",
        "      --config recipes/detox/config.yaml",
        "(see recipes/README.md).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Fast help: steer's own fields read from the source (no torch/transformers/trl import)
# --------------------------------------------------------------------------------------------------

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # steer/
_SAFE_BUILTINS = {"sorted": sorted, "list": list, "tuple": tuple, "len": len, "str": str, "repr": repr}


@dataclass
class _SourceField:
    name: str
    type: str
    default: str
    help: str
    choices: list | None = None


@dataclass
class _SourceClass:
    name: str
    doc: str
    fields: list[_SourceField]
    external_bases: list[str]  # bases defined outside steer (their fields are listed by --help-all)


def _module_file(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "steer":
        return None
    base = os.path.join(_PACKAGE_ROOT, *parts[1:])
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


@lru_cache(maxsize=32)
def _parse_module(module: str):
    import ast

    path = _module_file(module)
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return ast.parse(handle.read(), filename=path)


def _absolute(module: str, node) -> str:
    """The absolute name of what ``node`` (an ``ImportFrom`` in ``module``) imports from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    path = _module_file(module)
    is_package = path is not None and os.path.basename(path) == "__init__.py"
    # a plain module's own package is one level up; a package (its __init__.py) is its own package
    package = parts[: len(parts) - node.level + 1] if is_package else parts[: -node.level]
    return ".".join(package + ([node.module] if node.module else []))


def _module_names(module: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(literal module constants, imported name -> defining module) of a steer module."""
    import ast

    tree = _parse_module(module)
    constants = dict(_module_constants_shallow(module))
    imports: dict[str, str] = {}
    for node in tree.body if tree is not None else []:
        if isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                imports[alias.asname or alias.name] = source
    for name, source in imports.items():  # constants imported from another steer module (through re-exports)
        if name not in constants and name.isupper():
            value = _imported_constant(source, name)
            if value is not None:
                constants[name] = value
    return constants, imports


def _imported_constant(module: str, name: str, depth: int = 0) -> Any:
    """The literal constant ``name`` as defined in steer ``module`` or in the steer module it imports it from
    (a package's ``__init__`` re-exporting it, say); None when it is not a readable literal."""
    import ast

    if not module.startswith("steer") or depth > 3:
        return None
    theirs = _module_constants_shallow(module)
    if name in theirs:
        return theirs[name]
    tree = _parse_module(module)
    for node in tree.body if tree is not None else []:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            return _imported_constant(_absolute(module, node), original, depth + 1)
    return None


@lru_cache(maxsize=32)
def _module_constants_shallow(module: str) -> dict[str, Any]:
    import ast

    tree = _parse_module(module)
    constants: dict[str, Any] = {}
    for node in tree.body if tree is not None else []:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if isinstance(target, ast.Name):
            value = _evaluate(node.value, constants)  # literals, and expressions of earlier constants
            if not isinstance(value, _Source):
                constants[target.id] = value
    return constants


def _evaluate(node, constants: dict[str, Any]) -> Any:
    """Evaluate a help string / default written in steer's own source (literals, module constants, f-strings)."""
    import ast

    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, ast.Dict) and all(key is not None for key in node.keys):
        keys = [_evaluate(key, constants) for key in node.keys]
        if not any(isinstance(key, _Source) for key in keys):  # a registry: literal keys, any values
            return {key: _evaluate(value, constants) for key, value in zip(keys, node.values)}
    try:
        code = compile(ast.Expression(node), "<help>", "eval")
        return eval(code, {"__builtins__": _SAFE_BUILTINS}, dict(constants))  # noqa: S307 (steer's own source)
    except Exception:  # noqa: BLE001 - fall back to the source text
        return _Source(ast.unparse(node))


class _Source(str):
    """Source text that could not be evaluated (shown as written)."""

    def __repr__(self) -> str:
        return str(self)


def _source_class(module: str, name: str, depth: int = 0) -> _SourceClass | None:
    """The dataclass ``name`` as written in steer's source, with the fields of its steer bases first."""
    import ast

    tree = _parse_module(module)
    if tree is None or depth > 4:
        return None
    constants, imports = _module_names(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:
        source = imports.get(name)
        return _source_class(source, name, depth + 1) if source and source.startswith("steer") else None
    inherited: list[_SourceField] = []
    external: list[str] = []
    for base in node.bases:
        base_name = ast.unparse(base)
        parent = None
        if isinstance(base, ast.Name):
            here = any(isinstance(n, ast.ClassDef) and n.name == base.id for n in tree.body)
            source = module if here else imports.get(base.id, "")
            if source.startswith("steer"):
                parent = _source_class(source, base.id, depth + 1)
        if parent is None:
            external.append(f"{imports.get(base_name, '')}.{base_name}".lstrip("."))
        else:
            inherited += parent.fields
            external += parent.external_bases
    own: list[_SourceField] = []
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        annotation = ast.unparse(item.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        default, help_text, choices = "", "", None
        value = item.value
        is_field = (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field"
        )
        if is_field:
            keywords = {k.arg: k.value for k in value.keywords}
            init = keywords.get("init")
            if isinstance(init, ast.Constant) and init.value is False:
                continue
            if "default" in keywords:
                default = repr(_evaluate(keywords["default"], constants))
            elif "default_factory" in keywords:
                factory = keywords["default_factory"]
                if isinstance(factory, ast.Lambda):
                    default = repr(_evaluate(factory.body, constants))
                else:
                    default = {"list": "[]", "dict": "{}"}.get(
                        ast.unparse(factory), ast.unparse(factory) + "()"
                    )
            metadata = _evaluate(keywords["metadata"], constants) if "metadata" in keywords else None
            if isinstance(metadata, dict):
                help_text = str(metadata.get("help", ""))
                choices = metadata.get("choices")
        elif value is not None:
            default = repr(_evaluate(value, constants))
        own.append(_SourceField(item.target.id, annotation, default, help_text, choices))
    names = {f.name for f in own}
    fields = [f for f in inherited if f.name not in names] + own
    doc = (ast.get_docstring(node) or "").strip().split("\n\n")[0]
    return _SourceClass(name, " ".join(doc.split()), fields, external)


def _field_help(field_: _SourceField, width: int = 100) -> list[str]:
    import textwrap

    kind = field_.type.replace("typing.", "")
    head = f"  --{field_.name} {kind}"
    if field_.choices:
        head += " {" + ",".join(map(str, field_.choices)) + "}"
    text = field_.help.strip()
    if field_.default not in ("", "None", "''"):
        text = f"{text} (default: {field_.default})" if text else f"(default: {field_.default})"
    lines = [head]
    if text:
        lines += textwrap.wrap(text, width=width, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return lines


def fast_help(command: Command) -> str | None:
    """``steer <command> --help`` from the source of the command's dataclasses (no heavy import).

    Lists steer's own fields, one group per dataclass (the script arguments first, then the trainer
    config's own fields); the fields inherited from transformers/trl are listed by ``--help-all``. Returns
    None when the source cannot be read (then the full parser help is shown).
    """
    classes = []
    for name in command.arg_types:
        found = _source_class(command.module, name)
        if found is None:
            if command.optional_dataclasses:
                continue
            return None
        classes.append(found)
    prog = f"{PROG} {command.name}"
    lines = [
        f"usage: {prog} [--config FILE.yaml] [--key value ...]",
        "",
        f"{command.help}. Every option below is also a key of the --config YAML; the command line wins over "
        "the YAML; an `env:` mapping in the YAML sets environment variables.",
    ]
    external: list[str] = []
    for cls in classes:
        lines += ["", f"{cls.name}: {cls.doc}" if cls.doc else f"{cls.name}:"]
        for field_ in cls.fields:
            lines += _field_help(field_)
        external += [b for b in cls.external_bases if b not in external]
    lines += [
        "",
        "options:",
        "  -h, --help     show this help (steer's own fields)",
        "  --help-all     also list every inherited field"
        + (f" of {', '.join(external)}" if external else ""),
        "  --config FILE  a recipe YAML whose keys are the fields above",
    ]
    if external:
        lines += [
            "",
            f"Inherited fields ({', '.join(external)}: output_dir, learning_rate, max_steps, per_device_train_batch_size, "
            f"save_steps, seed, ...) are accepted too; `{prog} --help-all` lists them.",
        ]
    return "\n".join(lines)
