"""How every command fails: one readable line on stderr (the problem and the fix) and exit
code 1. Our errors all derive from GrassIndexError; OSError (disk full, permission) is shown
the same way; anything else is a bug, reported as one (a traceback with GRASS_INDEX_DEBUG=1)."""
from __future__ import annotations

import functools
import os
import shlex

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import GrassIndexError, cli_spelling
from ..untrusted import safe_text

# results go to stdout (`> file` captures them), progress, warnings and errors to stderr
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a long path stays on one line
out = Console(highlight=False, soft_wrap=True)
EXIT_ERROR = 1


def safe(s) -> str:
    """A string for rich output: control characters made visible (a string recorded in an
    index cannot drive the terminal), then markup escaped (a path with [brackets] prints as
    itself)."""
    return escape(safe_text(s))


def shell_arg(path) -> str:
    """A path as a shell word for the 'next:' hints (quoted when it needs to be), for rich."""
    return safe(shlex.quote(str(path)))


def fail(msg: str, code: int = EXIT_ERROR):
    """Print ``error: msg`` (plain text: escaped here) and exit."""
    err.print(f"[bold red]error:[/] {safe(msg)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def errors(fn):
    """Turn every exception of a command into one readable line + exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with cli_spelling():  # errors name their fixes as this command's flags
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            fail("interrupted; re-run the same command to resume", 130)
        except Exception as e:
            if os.environ.get("GRASS_INDEX_DEBUG"):
                raise
            if isinstance(e, GrassIndexError):
                fail(str(e))
            if isinstance(e, OSError):
                fail(f"{e.strerror or e} ({getattr(e, 'filename', '') or ''})")
            fail(f"internal error {type(e).__name__}: {e} (set GRASS_INDEX_DEBUG=1 for "
                 "a traceback and please report it)")

    return wrapper
