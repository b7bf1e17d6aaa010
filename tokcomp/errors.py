"""The failures tokcomp explains in one line: what went wrong, which file or option, and the
fix. The command line prints that line alone (`--debug` adds the traceback) and exits with
the error's code: 2 when the command asks for something that cannot work, 1 when the run
fails, 130 when it is interrupted."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

USAGE = 2
RUNTIME = 1
INTERRUPTED = 130


class TokcompError(Exception):
    """A failure whose message names the file or option and the fix (exit code 1)."""

    exit_code = RUNTIME

    def __init__(self, message: str) -> None:
        super().__init__(original_message(message))


class UsageError(TokcompError, ValueError):
    """What the command asks for cannot work: an option's value, or a file an option names
    (exit code 2)."""

    exit_code = USAGE


class StaleResultsError(UsageError):
    """Saved results or a saved search state were made from other inputs than this run's."""


class StateError(TokcompError):
    """A file tokcomp wrote itself (results.jsonl, a search state) cannot be read."""


class Interrupted(TokcompError):
    """The user interrupted the run; the message says what was saved (exit code 130)."""

    exit_code = INTERRUPTED


def original_message(message: str) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back as
    "Caught X in DataLoader worker ...\\nOriginal Traceback ...\\nmodule.X: message": its
    last line holds the message."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[-1]


@contextmanager
def interruption_says(message: str) -> Iterator[None]:
    """Inside the block, Ctrl-C ends the run as Interrupted('interrupted: ' + `message`):
    one line saying what was saved and how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {message}") from None
