"""Errors a user can cause, and the process exit codes that report them.

A :class:`BnfoldError` is a mistake in the input or the invocation. The library never names a
command-line flag: an error about one option carries the option's parameter name in ``option`` and the
CLI puts the flag in front of the message. The CLI prints it as one line
(``bnfold: error: ...``) and exits with :data:`EXIT_USAGE`; it never shows a traceback unless asked.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # outputs differ, or `--verify` rejected a fold
EXIT_USAGE = 2  # bad usage or bad input
EXIT_INTERNAL = 3  # a bug in bnfold


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt is for SIGINT, so that finally blocks run."""


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back while a temporary file is created and recorded for cleanup: an
    interrupt raised in between would leave it behind. They are delivered when the block ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class BnfoldError(Exception):
    """A user-facing error: one line saying what went wrong, and optionally how to fix it."""

    def __init__(self, message: str, note: str | None = None, exit_code: int = EXIT_USAGE,
                 option: str | None = None):
        super().__init__(message)
        self.message = message
        self.note = note
        self.exit_code = exit_code
        self.option = option  # the library parameter at fault (e.g. "shapes"); the CLI names its flag

    def __reduce__(self):  # keep note, exit code and option across processes (fold --jobs)
        return type(self), (self.message, self.note, self.exit_code, self.option)

    def one_line(self) -> str:
        """The message as printed on stderr: what went wrong, then `Note:` how to fix it."""
        text = " ".join(self.message.split())
        if self.note:
            text += f" Note: {' '.join(self.note.split())}"
        return text


def first_line(exc: BaseException) -> str:
    """First non-empty line of an exception message, for one-line errors."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
