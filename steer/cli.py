"""The ``steer`` command line: ``steer train constrained|persona``, ``steer eval toxicity|opinions``, ``steer demo``.

Every command reads an optional recipe YAML (``--config FILE.yaml``) and ``--key value`` overrides into the
command's config dataclasses with TRL's :class:`~trl.TrlParser` (command line wins over the YAML; a YAML
``env:`` mapping sets environment variables first). Unknown keys, in the YAML or on the command line, are
errors that name the key. ``steer <command> --help`` lists steer's own fields with their help text (read from
the source, without importing torch/transformers/trl); ``--help-all`` also lists the inherited Trainer/SFTConfig
fields. User errors (:class:`steer.errors.UserInputError`) end in one line and exit status 2 (``steer --debug``
or ``STEER_DEBUG=1`` adds the traceback).

The CLI runs in-process, so it works unchanged under ``accelerate launch``::

    accelerate launch --config_file accelerate_configs/ddp.yaml -m steer.cli train constrained --config X.yaml
    accelerate launch --config_file accelerate_configs/ddp.yaml $(which steer) train constrained --config X.yaml

Command modules are imported only when their command runs, so ``steer --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from steer.errors import UserInputError

logger = logging.getLogger("steer.cli")

PROG = "steer"


@dataclass(frozen=True)
class Command:
    """One leaf command: the module that implements it, its config dataclasses and its entry point."""

    words: tuple[str, ...]
    module: str
    arg_types: tuple[str, ...]
    entry: str
    help: str
    optional_dataclasses: bool = False  # demo: run without arguments when the module defines none
    report_files: tuple[str, ...] = ()  # markdown reports (under the parsed output_dir) printed at the end

    @property
    def name(self) -> str:
        return " ".join(self.words)


COMMANDS: tuple[Command, ...] = (
    Command(
        ("train", "constrained"),
        "steer.scripts.constrained",
        ("ConstrainedScriptArguments", "ConstrainedConfig"),
        "train_constrained",
        "fine-tune a policy under a sequence-level constraint (NADO guidance + closed-form KL)",
    ),
    Command(
        ("train", "persona"),
        "steer.scripts.persona",
        ("PersonaScriptArguments", "PersonaConfig"),
        "train_persona",
        "train a persona soft-prompt network on survey answers (frozen LLM)",
    ),
    Command(
        ("eval", "toxicity"),
        "steer.eval.toxicity",
        ("ToxicityEvalArguments",),
        "run_toxicity_eval",
        "RealToxicityPrompts evaluation: expected max toxicity, toxicity probability (with 95% intervals), "
        "perplexity, distinct-n",
        report_files=("toxicity_report.md",),
    ),
    Command(
        ("eval", "agreement"),
        "steer.eval.toxicity",
        ("OracleAgreementArguments",),
        "run_oracle_agreement",
        "agreement (AUC, accuracy, F1) of a toxicity oracle with the Perspective labels shipped in RTP",
    ),
    Command(
        ("eval", "opinions"),
        "steer.eval.opinions",
        ("OpinionEvalArguments",),
        "run_opinion_eval",
        "OpinionQA evaluation: per-individual accuracy and representativeness against Pew distributions",
        report_files=("opinions.md",),
    ),
    Command(
        ("demo",),
        "steer.demo",
        ("DemoArguments",),
        "run_demo",
        "short detox run on the embedded SmolLM2-135M with a before/after table",
        optional_dataclasses=True,
    ),
)


class CommandLineError(Exception):
    """A usage error: printed as ``steer <command>: error: ...`` with exit status 2."""

    def __init__(self, command: str, message: str):
        super().__init__(message)
        self.command = command


# --------------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------------


def _version() -> str:
    from steer import __version__

    return __version__


def _usage(prefix: tuple[str, ...] = ()) -> str:
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

_PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))
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
    if not node.level:
        return node.module or ""
    package = module.split(".")[: -node.level]  # a module's own package is one level up
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
    for name, source in imports.items():  # constants imported from another steer module (one level)
        if name not in constants and name.isupper() and source.startswith("steer"):
            theirs = _module_constants_shallow(source)
            if name in theirs:
                constants[name] = theirs[name]
    return constants, imports


@lru_cache(maxsize=32)
def _module_constants_shallow(module: str) -> dict[str, Any]:
    import ast

    tree = _parse_module(module)
    constants: dict[str, Any] = {}
    for node in tree.body if tree is not None else []:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _evaluate(node.value, constants)  # literals, and expressions of earlier constants
            if not isinstance(value, _Source):
                constants[node.targets[0].id] = value
    return constants


def _evaluate(node, constants: dict[str, Any]) -> Any:
    """Evaluate a help string / default written in steer's own source (literals, module constants, f-strings)."""
    import ast

    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
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


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def find_command(argv: Sequence[str]) -> tuple[Command | None, tuple[str, ...], list[str]]:
    """Split ``argv`` into (leaf command or None, the command words consumed, the remaining arguments)."""
    words: tuple[str, ...] = ()
    for token in argv:
        if token.startswith("-"):
            break
        candidate = (*words, token)
        if not any(c.words[: len(candidate)] == candidate for c in COMMANDS):
            break
        words = candidate
        leaf = next((c for c in COMMANDS if c.words == words), None)
        if leaf is not None:
            return leaf, words, list(argv[len(words) :])
    return None, words, list(argv[len(words) :])


def _load_command(command: Command) -> tuple[Any, list[type]]:
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as err:
        if err.name and command.module.startswith(err.name):
            raise CommandLineError(
                command.name, f"`{command.module}` is not available in this installation ({err})"
            ) from err
        raise
    types = []
    for name in command.arg_types:
        cls = getattr(module, name, None)
        if cls is None:
            if command.optional_dataclasses:
                continue
            raise CommandLineError(command.name, f"{command.module} does not define {name}")
        types.append(cls)
    if not hasattr(module, command.entry):
        raise CommandLineError(command.name, f"{command.module} does not define {command.entry}()")
    return module, types


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
        _, types = _load_command(command)
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
    dests = {action.dest for action in parser._actions}
    if CPU_DEFAULTS.keys() <= dests and not _accelerator_available():
        defaults = DEEPSPEED_CPU_DEFAULTS if _deepspeed_requested() else CPU_DEFAULTS
        parser.set_defaults(**{k: v for k, v in defaults.items() if k in dests})
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


def _normalise_config_flag(args: list[str]) -> tuple[list[str], str | None]:
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
        _, types = _load_command(command)
    parser = make_parser(command, types)
    try:
        args, config_path = _normalise_config_flag(list(args))
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


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


def _accelerator_available() -> bool:
    import torch

    accel = getattr(torch, "accelerator", None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


# Defaults that replace TrainingArguments' own on a machine without an accelerator (YAML and flags still win):
# SFTConfig defaults to bf16=True, which TrainingArguments rejects without a GPU unless use_cpu is set.
CPU_DEFAULTS = {"use_cpu": True, "bf16": False}
# A DeepSpeed launch on CPU ranks: accelerate runs DeepSpeed only when use_cpu is off, and needs a backend
# (gloo) to set up the process group; DeepSpeed itself needs DS_ACCELERATOR=cpu (set by the launch below).
DEEPSPEED_CPU_DEFAULTS = {"use_cpu": False, "bf16": False, "ddp_backend": "gloo"}


def _deepspeed_requested() -> bool:
    from steer.trainers.sharding import deepspeed_requested  # (torch is imported by then anyway)

    return deepspeed_requested()


def _use_cpu_when_no_accelerator() -> None:
    """Launched with several ranks on a machine without an accelerator -> make accelerate use gloo on CPU.

    Without it ``TrainingArguments(use_cpu=False)`` leaves each rank with ``DistributedType.NO`` (every rank
    trains alone on the full data) although torch.distributed is up. Setting ``use_cpu: true`` in the
    recipe does the same explicitly.
    """
    _check_gpu_launch_config()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "ACCELERATE_USE_CPU" in os.environ:
        return
    if not _accelerator_available():
        if _deepspeed_requested():  # DeepSpeed on CPU ranks (see DEEPSPEED_CPU_DEFAULTS)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            return
        os.environ["ACCELERATE_USE_CPU"] = "true"


def _check_gpu_launch_config() -> None:
    """A GPU DeepSpeed config (``mixed_precision: bf16``/``fp16``) launched on a machine without an accelerator
    fails on every rank once its model has loaded; refuse it at once, pointing at the ``*_cpu.yaml`` configs."""
    flag = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower()
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if flag not in _TRUE or precision not in ("bf16", "fp16") or _accelerator_available():
        return
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    cpu_config = f"accelerate_configs/zero{stage}_cpu.yaml" if stage in ("2", "3") else "a *_cpu.yaml config"
    raise CommandLineError(
        "",
        f"the accelerate config asks for DeepSpeed with mixed_precision={precision}, a GPU setting, but this "
        f"machine has no accelerator; launch with {cpu_config} (accelerate_configs/*_cpu.yaml: the same settings "
        "on CPU ranks, fp32)",
    )


_TRUE = ("1", "true", "yes", "on")


def _training_args(parsed: Iterable[Any]):
    from transformers import TrainingArguments

    return next((p for p in parsed if isinstance(p, TrainingArguments)), None)


def _log_process(command: Command, training_args) -> None:
    state = training_args.distributed_state
    backend = getattr(state, "backend", None)
    logger.info(
        "%s: rank %d/%d (local rank %d), distributed_type=%s, backend=%s, device=%s",
        command.name,
        training_args.process_index,
        training_args.world_size,
        training_args.local_process_index,
        getattr(state.distributed_type, "value", state.distributed_type),
        backend,
        training_args.device,
    )


SHARDED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
MAX_DIGEST_VALUES = 500_000_000  # skip the check for huge full fine-tunes (hashing would take minutes)


def parameter_digest(modules: Iterable[Any], *, max_values: int | None = None) -> tuple[str, int]:
    """SHA-256 over the trained weights of ``modules`` (fp32 bytes, fixed order); returns (hex, #values).

    For an ``nn.Module``: its parameters that require grad or belong to an adapter (``lora_``), sorted by
    name. For an object with ``trainable_parameters()`` (the guidance model, whose parameters are frozen
    between rounds): exactly those. Used after distributed training to check that all ranks agree.
    Returns ``("", 0)`` when there are more than ``max_values`` values. FSDP2-sharded parameters (``DTensor``)
    and DeepSpeed ZeRO-3 partitions are gathered first, so there it is a collective: every rank calls it with
    the same modules.
    """
    import torch
    from torch.distributed.tensor import DTensor

    groups = []
    for module in modules:
        if module is None:
            continue
        module = getattr(module, "module", module)  # DDP wrapper
        if callable(getattr(module, "trainable_parameters", None)):
            named = [(str(i), p) for i, p in enumerate(module.trainable_parameters())]
        else:
            named = sorted(
                ((n, p) for n, p in module.named_parameters() if p.requires_grad or _is_adapter(n)),
                key=lambda item: item[0],
            )
        groups.append(named)
    total = sum(int(getattr(p, "ds_numel", p.numel())) for named in groups for _, p in named)
    if max_values is not None and total > max_values:
        return "", 0
    digest = hashlib.sha256()
    count = 0
    for index, named in enumerate(groups):
        for name, param in named:
            shape = tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition's full shape
            digest.update(f"{index}:{name}:{shape}".encode())
            value = param.detach()
            if isinstance(value, DTensor):  # FSDP2 shard: digest the whole value (an all-gather)
                value = value.full_tensor()
            elif hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 partition: gather it (a collective)
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    value = param.detach().clone()
            digest.update(value.to("cpu", torch.float32).contiguous().numpy().tobytes())
            count += int(getattr(param, "ds_numel", param.numel()))
    return digest.hexdigest(), count


def _is_adapter(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def _result_modules(result: Any) -> list[Any]:
    """The trained modules behind an entry point's result (a Trainer or a model)."""
    import torch

    if isinstance(result, torch.nn.Module):
        return [result]
    model = getattr(result, "model", None)
    if not isinstance(model, torch.nn.Module):
        return []
    modules = [model]
    for attr in ("guidance", "guidance_model"):
        extra = getattr(result, attr, None)
        if (
            extra is not None
            and extra is not model
            and callable(getattr(extra, "trainable_parameters", None))
        ):
            modules.append(extra)
    return modules


def _log_replica_digest(command: Command, training_args, result: Any) -> None:
    """Log a digest of the trained weights on every rank and warn when the ranks disagree."""
    modules = _result_modules(result)
    if not modules:
        return
    # the trainer's AcceleratorState knows FSDP (training_args.distributed_state, a PartialState, does not)
    state = getattr(getattr(result, "accelerator", None), "state", None) or training_args.distributed_state
    kind = str(getattr(state.distributed_type, "value", ""))
    # Megatron: each rank holds only its shard, local digests differ; FSDP (steer's trainers run FSDP2 only) and
    # DeepSpeed: parameter_digest gathers the shards, so every rank digests the full weights
    if kind in SHARDED_TYPES and kind not in ("FSDP", "DEEPSPEED"):
        return
    digest, count = parameter_digest(modules, max_values=MAX_DIGEST_VALUES)
    if not count:
        return
    logger.info(
        "%s: rank %d/%d trained-parameter digest %s (%d values)",
        command.name,
        training_args.process_index,
        training_args.world_size,
        digest,
        count,
    )
    if training_args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            digests: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                logger.warning("%s: ranks ended with DIFFERENT weights: %s", command.name, digests)
            elif training_args.process_index == 0:
                logger.info("%s: all %d ranks hold identical trained weights", command.name, len(digests))


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def run(argv: Sequence[str] | None = None) -> Any:
    """Run one command and return what its entry point returns (e.g. the trainer). Raises CommandLineError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, words, rest = find_command(argv)
    if command is None:
        if not rest or rest[0] in ("-h", "--help"):
            print(_usage(words))
            return None
        if rest[0] == "--version" and not words:
            print(f"{PROG} {_version()}")
            return None
        known = sorted({c.words[len(words)] for c in COMMANDS if c.words[: len(words)] == words})
        where = f"`{PROG} {' '.join(words)}`" if words else f"`{PROG}`"
        raise CommandLineError(
            " ".join(words), f"unknown command {rest[0]!r} for {where}; choose from: {', '.join(known)}"
        )

    if "--help-all" in rest:  # the full parser help: steer's fields and every inherited one
        rest = ["--help" if token == "--help-all" else token for token in rest]
    elif "-h" in rest or "--help" in rest:
        text = fast_help(command)  # steer's own fields, read from the source (no torch/trl import)
        if text is not None:
            print(text)
            return None
    if "-h" not in rest and "--help" not in rest:
        try:  # a missing recipe file is reported before the (slow) command import
            _normalise_config_flag(rest)
        except CommandLineError as err:
            raise CommandLineError(command.name, str(err)) from None
    _quiet_cpu_accelerator()
    if command.words[0] == "train":
        try:
            _use_cpu_when_no_accelerator()
        except CommandLineError as err:
            raise CommandLineError(command.name, str(err)) from None
    module, types = _load_command(command)
    entry = getattr(module, command.entry)
    if not types:  # a command without a config dataclass (e.g. a demo with fixed settings)
        if rest and rest[0] in ("-h", "--help"):
            print(f"usage: {PROG} {command.name}\n\n{command.help}\n\n{(entry.__doc__ or '').strip()}")
            return None
        if rest:
            raise CommandLineError(command.name, f"takes no arguments, got {' '.join(rest)}")
        return entry()

    parsed = parse_command_args(command, rest, types)
    training_args = _training_args(parsed)
    if training_args is not None:
        _log_process(command, training_args)
    result = entry(*parsed)
    if training_args is not None:
        _log_replica_digest(command, training_args, result)
    elif command.words[0] == "eval":
        _print_result(command, parsed, result)
    return result


def shutdown_distributed() -> None:
    """Leave the process group cleanly: a barrier, then ``destroy_process_group``.

    Without it a rank that finishes first exits while gloo's threads still serve the other rank, and the C++
    runtime aborts it at interpreter exit ("terminate called without an active exception", SIGABRT), which
    turns a finished multi-process run into a failed one.
    """
    if "torch" not in sys.modules:  # nothing imported torch, so no process group exists (keeps --help lazy)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _print_result(command: Command, parsed: Sequence[Any], result: Any) -> None:
    """Show an evaluation's markdown report (or its scalar results) on stdout."""
    import json
    from pathlib import Path

    candidates = []
    report = result.get("report") if isinstance(result, dict) else None
    if isinstance(report, dict) and report.get("markdown"):
        candidates.append(Path(report["markdown"]))
    for args in parsed:
        output_dir = getattr(args, "output_dir", None)
        if output_dir:
            candidates += [Path(output_dir) / name for name in command.report_files]
    for path in candidates:
        if path.is_file():
            print(path.read_text())
            print(f"({command.name}: report written to {path.parent})")
            return
    if isinstance(result, dict):
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
        print(json.dumps(scalars, indent=2, default=str))


def _quiet_cpu_accelerator() -> None:
    """On a machine without an accelerator, tell DeepSpeed so (``DS_ACCELERATOR=cpu``): it would otherwise
    warn "Setting accelerator to CPU" whenever a library imports it, on every command."""
    if "DS_ACCELERATOR" not in os.environ and not _accelerator_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _setup_logging() -> None:
    # matplotlib logs "generated new fontManager" at INFO whenever its font cache is (re)built
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if not logging.getLogger().handlers:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )


def _debug_requested(argv: list[str]) -> bool:
    """``steer --debug <command> ...`` (before the command words) or ``STEER_DEBUG=1``; pops the flag."""
    debug = os.environ.get("STEER_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    while argv and argv[0] == "--debug":
        argv.pop(0)
        debug = True
    return debug


def _error_line(argv: Sequence[str], command_name: str | None, err: BaseException) -> str:
    if command_name is None:
        command, words, _ = find_command(argv)
        command_name = command.name if command is not None else " ".join(words)
    message = " ".join(str(err).split()) or type(err).__name__
    return f"{PROG} {command_name}".strip() + f": error: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``steer = steer.cli:main``); returns the exit status.

    Usage errors and user errors (:class:`steer.errors.UserInputError`: a bad config value, path, data file
    or artefact) print one line ``steer <command>: error: ...`` and return 2; ``--debug`` (before the
    command) or ``STEER_DEBUG=1`` also prints their traceback. Any other exception is an internal error and
    propagates with its traceback.
    """
    _setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        run(argv)
        shutdown_distributed()
    except CommandLineError as err:
        if debug:
            traceback.print_exc()
        if int(os.environ.get("RANK", "0") or 0) == 0:  # every rank parses the same arguments: one line
            print(_error_line(argv, err.command, err), file=sys.stderr)
        return 2
    except UserInputError as err:
        if debug:
            traceback.print_exc()
        print(_error_line(argv, None, err), file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line (a training run says how to resume), status 130
        if debug:
            traceback.print_exc()
        command, words, _ = find_command(argv)
        name = command.name if command is not None else " ".join(words)
        detail = " ".join(str(err).split())
        print(f"{PROG} {name}".strip() + ": interrupted" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 130
    except SystemExit as exit_:  # argparse --help / usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except (
        BrokenPipeError
    ):  # e.g. `steer train constrained --help | head`: the reader left; exit like SIGPIPE
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "COMMANDS",
    "Command",
    "CommandLineError",
    "fast_help",
    "find_command",
    "main",
    "make_parser",
    "parameter_digest",
    "parse_command_args",
    "run",
    "shutdown_distributed",
]
