"""The library (everything outside grass_index/cli/) never hard-codes a command-line spelling
in a string it can show a user: a flag of the `grass-index` command (``--damping``) or one of
its commands (``grass-index verify``) appears only as the CLI half of ``errors.spelled`` (or
through ``errors.option`` / ``errors.repair_command``), so a Python caller reads the Python
spelling (``damping=``, ``verify_index(...)``). Read from the source with ast: every string
literal but docstrings, wherever it is (a raise, a warning, a log line, a message kept in a
variable or a default argument). The flags and commands are the CLI's own, read from its typer
app, so a string like ``pip install --no-build-isolation`` is not one.

Run as a script to list what it finds: ``python tests/test_message_spelling.py``.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "grass_index"

# Calls whose argument is already spelled for the caller: spelled's first argument is the CLI
# half (its second, the Python half, is checked like any other string).
SPELLERS = {"spelled": (0,)}

# (file relative to grass_index/, a piece of the literal) -> why it may keep a CLI spelling.
ALLOWED: dict[tuple[str, str], str] = {
}


def cli_names() -> tuple[set[str], set[str]]:
    """Every long flag of every grass-index command, and every command name."""
    import typer

    from grass_index.cli.main import app

    flags: set[str] = set()
    commands: set[str] = set()

    def walk(cmd):
        for p in cmd.params:
            flags.update(o for o in (*p.opts, *getattr(p, "secondary_opts", ())) if
                         o.startswith("--"))
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            commands.add(name)
            walk(sub)

    walk(typer.main.get_command(app))
    return flags, commands


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _callee(node) -> str | None:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _literals(tree):
    """(literal node, its text) for every string literal but docstrings and spelled CLI halves;
    an f-string's text has ``{}`` where its values go."""
    skip = _docstrings(tree)
    out = []

    def visit(node, exempt=False):
        if isinstance(node, ast.JoinedStr):
            if not exempt:
                out.append((node, "".join(v.value if isinstance(v, ast.Constant) else "{}"
                                          for v in node.values)))
            for v in node.values:  # the values inside {} are expressions of their own
                if isinstance(v, ast.FormattedValue):
                    visit(v.value, exempt)
            return
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not exempt and id(node) not in skip:
                out.append((node, node.value))
            return
        if isinstance(node, ast.Call) and _callee(node) in SPELLERS:
            visit(node.func)
            for i, a in enumerate(node.args):
                visit(a, exempt or i in SPELLERS[_callee(node)])
            for k in node.keywords:
                visit(k.value, exempt)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, exempt)

    visit(tree)
    return out


def cli_spellings(flags=None, commands=None) -> list[tuple[str, int, str, str]]:
    """(file, line, the CLI spelling, the literal) for each literal outside grass_index/cli/
    that hard-codes one and is not in ALLOWED."""
    if flags is None:
        flags, commands = cli_names()
    flag_re = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
    # a command, not prose about the package ("is not a grass-index build")
    command_re = re.compile(r"(?<!\ba )(?<!\ban )grass-index (%s)\b" % "|".join(
        sorted(map(re.escape, commands), key=len, reverse=True)))
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("cli/"):
            continue
        for node, text in _literals(ast.parse(path.read_text())):
            hits = [m for m in flag_re.findall(text) if m in flags]
            hits += [m.group(0) for m in command_re.finditer(text)]
            if hits and not any(f == rel and piece in text for f, piece in ALLOWED):
                found.append((rel, node.lineno, ", ".join(dict.fromkeys(hits)), text))
    return found


def test_library_strings_spell_cli_flags_only_through_spelled():
    found = cli_spellings()
    assert not found, (
        f"{len(found)} string(s) outside grass_index/cli/ hard-code a CLI spelling; write them "
        "with errors.spelled(cli, python) / errors.option(name, value) (or move a CLI-only "
        "message into cli/, or add it to ALLOWED with the reason):\n"
        + "\n".join(f"  grass_index/{f}:{line}: {hits}: {text[:90]!r}"
                    for f, line, hits, text in found))


def test_the_scan_sees_every_kind_of_literal():
    """The scanner itself: raise, warning, log line, variable, default argument and f-string
    are seen; docstrings and spelled's CLI half are not; spelled's Python half is."""
    src = '''
"""Module doc: --damping."""
def f(x, what="--data"):
    """Doc: `grass-index verify`."""
    msg = f"use --index {x}"
    log.warning("add --retrain to retrain")
    warnings.warn("run `grass-index merge DIR`")
    raise E(spelled("--hessian eFIM", "hessian='eFIM'") + " or --out DIR")
    raise E(spelled("--task FILE", "--task or task="))
    raise E("pip install --no-build-isolation; grass-index is installed")
'''
    tree = ast.parse(src)
    texts = [t for _, t in _literals(tree)]
    assert "Module doc: --damping." not in texts and "--hessian eFIM" not in texts
    flags = {"--damping", "--data", "--index", "--retrain", "--hessian", "--out", "--task"}
    pattern = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
    hits = [m for t in texts for m in pattern.findall(t) if m in flags]
    hits += [t for t in texts if "grass-index merge" in t]
    assert hits == ["--data", "--index", "--retrain", "--out", "--task",
                    "run `grass-index merge DIR`"]


if __name__ == "__main__":
    rows = cli_spellings()
    for f, line, hits, text in rows:
        print(f"grass_index/{f}:{line}: {hits}: {text[:100]!r}")
    print(f"{len(rows)} literal(s), {len({(f, line) for f, line, *_ in rows})} line(s), "
          f"{len({f for f, *_ in rows})} file(s)", file=sys.stderr)
