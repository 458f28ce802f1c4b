"""How the command line reports a mistake: one line on stderr naming the bad value and what is allowed,
exit status 2, nothing written; a failure of the machine (a full disk, a NaN run) is one line too, with
exit status 1; Ctrl-C is one line too, with exit status 130 (128 + SIGINT, as a shell reports it).
``--debug`` (any subcommand) re-raises instead, for the traceback.

Every subcommand gets this by building its parser with ``CommandLineParser`` (``add_subparsers`` passes
the class on) and running through ``run_reporting_errors``; the library only raises ValueError (and
the OSErrors of the files it is given) with a message written for the user.
"""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, List, Optional, Tuple

EXIT_USER_MISTAKE = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130
# OSErrors that name the user's own input: the path given does not fit.
_INPUT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM,
                 errno.ENAMETOOLONG, errno.ELOOP}


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (not the usage block) and that takes ``--debug``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser must not reset a --debug given before the subcommand.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, show the full traceback instead of one line")

    def error(self, message: str):
        self.exit(EXIT_USER_MISTAKE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        # Raised in a DataLoader worker: torch prepends the worker's traceback; its last line is the error.
        return lines[-1].partition(": ")[2] or lines[-1]
    return "; ".join(lines)


def describe(error: BaseException) -> Optional[Tuple[str, int]]:
    """(one-line message, exit status) for an error the user can act on; None for a bug (traceback)."""
    from .dispatch import BackendError
    from .train.engine import NonFiniteLossError

    if isinstance(error, OSError):
        if error.strerror:  # "[Errno 28] No space left on device: 'x'" -> "No space left on device: x"
            message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
        else:
            message = str(error)
        status = EXIT_USER_MISTAKE if error.errno is None or error.errno in _INPUT_ERRNOS else EXIT_RUN_FAILED
        return one_line(message), status
    if isinstance(error, (ValueError, BackendError)):
        return one_line(error), EXIT_USER_MISTAKE
    if isinstance(error, NonFiniteLossError):
        return one_line(error), EXIT_RUN_FAILED
    return None


def run_reporting_errors(command: str, action: Callable[[], None], debug: bool = False) -> int:
    """Run ``action``; an error ``describe`` knows becomes one stderr line and its exit status, Ctrl-C
    one line (what the run says about it, e.g. the checkpoint to resume from) and 130."""
    try:
        action()
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        print(f"simmim-fast {command}: {one_line(interrupt) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        described = None if debug else describe(error)
        if described is None:
            raise
        message, status = described
        print(f"simmim-fast {command}: error: {message}", file=sys.stderr)
        return status
    return 0


def parse_arguments(parser: argparse.ArgumentParser, argv: Optional[List[str]]):
    """``parser.parse_args`` that returns the exit status (2 for a bad flag, 0 for --help) instead of
    raising SystemExit, so an in-process ``main(argv)`` reports like the console script."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as exit_request:
        return None, exit_request.code if isinstance(exit_request.code, int) else EXIT_USER_MISTAKE
