"""The one exit-code contract of ``bundle-builder`` and ``offline-delivery`` (README.md, "Exit codes"), kept
by one function both commands' ``main`` go through.

    0   done
    1   it ran and failed (a check, a host, a run, a missing tool; also any unexpected error: Python's own code
        for an uncaught exception)
    2   usage: bad arguments (argparse exits 2 by itself) or a named file that is missing or unusable
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import sys
from typing import Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad arguments or input (exit 2): the message says which and what to give instead."""


class CommandFailed(RuntimeError):
    """The command ran, or could not run although its arguments are right (a tool is missing): exit 1."""


def run_command(prog: str, body: Callable[[], int],
                failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's ``body`` and map what escapes it onto the contract: ``UsageError`` -> 2, ``CommandFailed``
    (and ``failures``, a command's own "it failed" errors) -> 1, Ctrl-C -> 130, each with one line on stderr
    (``<prog>: error: <message>``, as argparse writes its own usage errors). ``body`` returns 0 or 1 itself."""
    try:
        return body()
    except UsageError as exc:
        _err(f"{prog}: error: {exc}")
        return EXIT_USAGE
    except (CommandFailed, *failures) as exc:
        _err(f"{prog}: error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


def _err(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")
