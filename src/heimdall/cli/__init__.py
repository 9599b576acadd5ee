"""The ``heimdall`` command line.

Every failure heimdall anticipates is printed as one line, ``error: <sentence>``, on stderr with
exit status 1 (2 for usage errors); no traceback is ever shown, since a traceback's locals could
hold plaintext. ``HMD_DEBUG=1`` re-raises unexpected errors for debugging.
"""

from __future__ import annotations

import os
import sys

import typer

from heimdall.cli import age, audit, aws, data, jobs, keys, kms, migrate, serve, tokens, worker
from heimdall.cli.common import app, err, out
from heimdall.errors import HeimdallError

# The command modules register their commands on ``app`` when imported.
_COMMANDS = (age, audit, aws, data, jobs, keys, kms, migrate, serve, tokens, worker)

__all__ = ["app", "main"]


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _usage_error(exc: typer.TyperException) -> int:
    """Print a usage error (bad option, missing argument) as one line; its exit status."""
    # Typer vendors click and keeps its exception types private, so NoArgsIsHelpError (a usage
    # error whose message is the help text) is recognised by name, as typer.rich_utils does.
    if type(exc).__name__ == "NoArgsIsHelpError":
        out.print(exc.format_message(), markup=False, end="")
        return 2
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    err.print(f"error: {_one_line(exc.format_message())}{hint}", markup=False)
    return int(getattr(exc, "exit_code", 2))


def _run() -> int:
    try:
        # standalone_mode=False: Typer would print usage errors as a multi-line panel.
        result = app(standalone_mode=False)
    except typer.TyperException as exc:
        return _usage_error(exc)
    except typer.Abort:
        err.print("error: aborted", markup=False)
        return 1
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console entry point: run the app and turn every anticipated failure into one line."""
    try:
        code = _run()
    except HeimdallError as exc:
        err.print(f"error: {_one_line(str(exc))}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("error: interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: never a traceback
        if os.environ.get("HMD_DEBUG") == "1":
            raise
        err.print(
            f"error: internal error ({type(exc).__name__}); set HMD_DEBUG=1 for details",
            markup=False,
        )
        sys.exit(70)
    sys.exit(code)
