"""The ``steer`` command line: ``steer train constrained|persona``, ``steer eval toxicity|agreement|opinions``,
``steer demo``.

Every command reads an optional recipe YAML (``--config FILE.yaml``) and ``--key value`` overrides into the
command's config dataclasses (command line wins over the YAML; a YAML ``env:`` mapping sets environment variables
first). ``steer <command> --help`` lists steer's own fields without importing torch; ``--help-all`` also the
inherited Trainer/SFTConfig fields. User errors end in one line and exit status 2 (``steer --debug`` or
``STEER_DEBUG=1`` adds the traceback).

The modules: ``commands`` (the command table), ``help`` (usage and the fast field help), ``parsing`` (recipe +
overrides into dataclasses), ``devices`` (CPU defaults and multi-rank CPU launches), ``replicas`` (the
trained-weight digest compared across ranks) and ``dispatch`` (``run`` and ``main``). Command modules are
imported only when their command runs, so ``steer --help`` stays fast.
"""

from steer.cli.commands import COMMANDS, Command, CommandLineError, find_command, load_command
from steer.cli.dispatch import main, run, setup_logging, shutdown_distributed
from steer.cli.help import fast_help
from steer.cli.parsing import make_parser, parse_command_args
from steer.cli.replicas import parameter_digest, result_modules

__all__ = [
    "COMMANDS",
    "Command",
    "CommandLineError",
    "fast_help",
    "find_command",
    "load_command",
    "main",
    "make_parser",
    "parameter_digest",
    "parse_command_args",
    "result_modules",
    "run",
    "setup_logging",
    "shutdown_distributed",
]
