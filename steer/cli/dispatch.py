"""Running a ``steer`` command: ``run`` (parse, set up the process, call the entry point) and ``main`` (the console
script: one line and exit status 2 for a user error, 130 for Ctrl-C).

The CLI runs in-process, so it works unchanged under ``accelerate launch``::

    accelerate launch --config_file accelerate_configs/ddp.yaml -m steer.cli train constrained --config X.yaml
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

from steer.cli.commands import COMMANDS, PROG, Command, CommandLineError, find_command, load_command
from steer.cli.devices import quiet_cpu_accelerator, use_cpu_when_no_accelerator
from steer.cli.help import fast_help, usage, version
from steer.cli.parsing import normalise_config_flag, parse_command_args
from steer.cli.replicas import log_replica_digest
from steer.errors import UserInputError

logger = logging.getLogger("steer.cli")


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


def run(argv: Sequence[str] | None = None) -> Any:
    """Run one command and return what its entry point returns (e.g. the trainer). Raises CommandLineError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, words, rest = find_command(argv)
    if command is None:
        if not rest or rest[0] in ("-h", "--help"):
            print(usage(words))
            return None
        if rest[0] == "--version" and not words:
            print(f"{PROG} {version()}")
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
            normalise_config_flag(rest)
        except CommandLineError as err:
            raise CommandLineError(command.name, str(err)) from None
    quiet_cpu_accelerator()
    if command.words[0] == "train":
        try:
            use_cpu_when_no_accelerator()
        except CommandLineError as err:
            raise CommandLineError(command.name, str(err)) from None
    module, types = load_command(command)
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
    if getattr(parsed[0], "prerequisites", None):  # a prerequisite's own run has none (prerequisite_argv)
        _run_prerequisites(command, rest, parsed, types)
    if training_args is not None:
        _log_process(command, training_args)
    result = entry(*parsed)
    if training_args is not None:
        log_replica_digest(command, training_args, result)
    elif command.words[0] == "eval":
        _print_result(command, parsed, result)
    return result


def _run_prerequisites(command: Command, rest: list[str], parsed: Sequence[Any], types) -> None:
    """Train the recipe's unfinished prerequisite runs first, in order (:mod:`steer.scripts.prerequisites`). Every
    one's settings, and this run's output directory, are checked before the first one trains. A prerequisite with
    this run's own ``output_dir`` is this run (e.g. the recipe's plain-SFT twin trained on its own): skipped."""
    from pathlib import Path

    from steer.scripts.output import check_output_dir, resolve_resume
    from steer.scripts.prerequisites import finished_run, prerequisite_argv

    script_args, training_args = parsed[0], _training_args(parsed)
    args, _ = normalise_config_flag(rest)
    own = Path(training_args.output_dir).expanduser().resolve()
    runs = [
        step for step in script_args.prerequisites if Path(step["output_dir"]).expanduser().resolve() != own
    ]
    pending = [(step, prerequisite_argv(args, step)) for step in runs if not finished_run(step["output_dir"])]
    if pending:  # this run's own output_dir would refuse it only after the prerequisites' hours: say so now
        owner = type(training_args).__name__
        resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, owner=owner)
        check_output_dir(
            training_args.output_dir,
            overwrite=bool(getattr(script_args, "overwrite_output_dir", False)),
            resume=resume,
            owner=type(script_args).__name__,
        )
    for step, argv in pending:
        try:
            parse_command_args(command, argv, types)
        except CommandLineError as err:
            raise CommandLineError(command.name, f"prerequisite run {step['output_dir']}: {err}") from None
    for index, (step, argv) in enumerate(pending, 1):
        overrides = ", ".join(f"{k}={v}" for k, v in step.items() if k != "output_dir")
        logger.info(
            "prerequisite %d/%d: training %s (%s) before this run",
            index,
            len(pending),
            step["output_dir"],
            overrides,
        )
        run([*command.words, *argv])  # its trainer is dropped before the next run loads a model
    done = len(runs) - len(pending)
    if done:
        logger.info("prerequisites: %d of %d already finished, not retrained", done, len(runs))


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


def setup_logging() -> None:
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
    setup_logging()
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
