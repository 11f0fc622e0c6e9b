"""User errors: bad config values, paths, data files and artefacts.

Everything steer raises because of what the user gave it (a config field out of range, a missing or empty
data file, a record without a needed key, an output directory holding another run, an artefact trained on a
different base model) is a :class:`UserInputError`. The ``steer`` command line prints such an error as one
line, ``steer <command>: error: <message>``, and exits with status 2; ``steer --debug ...`` or
``STEER_DEBUG=1`` also prints the traceback. Any other exception is an internal error and keeps its
traceback.

The subclasses keep the builtin type a caller may already catch: :class:`InputFileNotFoundError` is a
``FileNotFoundError``, :class:`InputKeyError` a ``KeyError``; all are ``ValueError``\\ s.
"""

from __future__ import annotations

__all__ = [
    "ArtefactMismatchError",
    "InputFileNotFoundError",
    "InputKeyError",
    "ModelLoadError",
    "RunInterrupted",
    "UserInputError",
    "first_line",
]


class UserInputError(ValueError):
    """A bad value, path, file or artefact given by the user; the message names it and what would be valid."""


class InputFileNotFoundError(UserInputError, FileNotFoundError):
    """A file or directory the user named (or a run should have written) does not exist."""

    def __str__(self) -> str:  # OSError would format (errno, strerror) pairs
        return str(self.args[0]) if self.args else ""


class InputKeyError(UserInputError, KeyError):
    """A name the user gave (a persona, a column, a constraint) is unknown."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(UserInputError, OSError):
    """A model name or path that does not load (unknown name, a directory without weights, ...)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ArtefactMismatchError(UserInputError):
    """Saved artefacts that do not belong together (another base model, another run's split)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says how to resume (the ``steer`` command line prints it as one
    line and exits with status 130)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def first_line(err: BaseException, *, typed: bool = False) -> str:
    """The first non-empty line of ``err``'s message, for one-line error messages that quote a cause.

    An empty message gives the exception's type name; ``typed`` prefixes the line with it
    (``"OSError: ..."``).
    """
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if typed:
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text or type(err).__name__
