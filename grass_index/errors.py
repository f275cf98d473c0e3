"""The one base class of every error grass-index raises on bad input or a broken index.

Each stage keeps its own error type (StoreError, CaptureError, FaissIndexError, TaskError,
AttributionError, ...) so a caller can tell them apart; all of them also derive from
GrassIndexError, so a caller (the CLI, a service) that only wants "our error: show the message,
which names the problem and the fix" catches this one class. Errors that were ValueError or
RuntimeError subclasses stay so, for callers that catch those.
"""
from __future__ import annotations


class GrassIndexError(Exception):
    """Bad input or a broken index directory; the message names the problem and the fix."""


__all__ = ["GrassIndexError", "cli_spelling", "option", "repair_command", "spelled"]


# --- how a fix is spelled: the CLI's flags on the command line, Python's arguments elsewhere ---
# An error names its fix in the caller's terms: `--damping 0.3` for someone at a shell,
# ``damping=0.3`` for someone calling build_index(). The CLI switches the spelling while one of
# its commands runs (``cli_spelling``); the library's default is Python's.
_SPELLING = ["python"]


def spelled(cli: str, python: str) -> str:
    """The fix ``cli`` (flags, a command line) while a CLI command runs, else ``python``."""
    return cli if _SPELLING[-1] == "cli" else python


def option(name: str, value=None) -> str:
    """An option as the caller writes it: ``--layers '!fc.*'`` on the command line (the value
    shell-quoted when it needs it), ``layers='!fc.*'`` in Python (the value's repr)."""
    import shlex

    cli, py = "--" + name.replace("_", "-"), name.replace("-", "_")
    if value is None:
        return spelled(cli, py)
    return spelled(f"{cli} {shlex.quote(str(value))}", f"{py}={value!r}")


def repair_command(path="DIR", task: str | None = None) -> str:
    """verify's repair of index ``path`` as the caller runs it: the command ``grass-index
    verify PATH --repair`` while a CLI command runs, else the call
    ``grass_index.verify_index('PATH', repair=True)``."""
    py_task = f", task={task!r}" if task else ""
    return spelled(f"`grass-index verify {path} --repair" + (f" --task {task}`" if task else "`"),
                   f"`grass_index.verify_index({str(path)!r}, repair=True{py_task})`")


class cli_spelling:
    """Context manager: errors raised inside name their fixes as command-line flags."""

    def __enter__(self):
        _SPELLING.append("cli")
        return self

    def __exit__(self, *exc):
        _SPELLING.pop()
        return False
