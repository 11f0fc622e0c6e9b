"""The table of ``steer`` commands: each leaf command's module, config dataclasses and entry point.

Command modules are imported only when their command runs (:func:`load_command`), so ``steer --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
        ("train", "oracle"),
        "steer.scripts.oracle",
        ("OracleScriptArguments", "OracleTrainingArguments"),
        "train_oracle",
        "train an offline toxicity oracle: a sequence classifier (LoRA) on RTP's Perspective labels, with its "
        "held-out AUC",
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
        "steer.eval.agreement",
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
        ("export", "policy"),
        "steer.interpolation",
        ("ExportPolicyArguments",),
        "run_export_policy",
        "re-export a finished constrained run's LoRA policy at another interpolation weight toward its start "
        "(WiSE-FT)",
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


def load_command(command: Command) -> tuple[Any, list[type]]:
    """Import the command's module; return it and its config dataclasses (in ``arg_types`` order)."""
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
