"""Sizes a reader can hold: no function or method in grass_index/ over 80 lines, no folder
(the .py files directly in it) over 2,000 lines. The allowlists name today's offenders that
are being split this session, each with who is splitting it; an entry that no longer offends
fails too, so the lists only ever shrink.

    python tests/test_architecture_size.py     # prints folder sizes and the longest functions
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "grass_index"
MAX_FUNCTION_LINES = 80
MAX_FOLDER_LINES = 2000

# "file name::qualified function name" -> who is splitting it (keys survive a file's move
# between folders)
ALLOWED_FUNCTIONS = {
}
# folder (relative to grass_index/) -> who is splitting it
ALLOWED_FOLDERS = {
}


def function_sizes() -> dict[str, tuple[int, str]]:
    """{"file.py::Qual.name": (lines, path relative to grass_index/)} for every function."""
    sizes: dict[str, tuple[int, str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))

        def visit(node, prefix: str):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = prefix + child.name
                    key = f"{path.name}::{name}"
                    lines = child.end_lineno - child.lineno + 1
                    if key not in sizes or sizes[key][0] < lines:
                        sizes[key] = (lines, rel)
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")
                else:
                    visit(child, prefix)

        visit(ast.parse(path.read_text()), "")
    return sizes


def folder_sizes() -> dict[str, int]:
    """{folder relative to grass_index/ ("." for the package's own files): lines of its .py
    files (not its subfolders')}."""
    sizes: dict[str, int] = {}
    for path in PACKAGE.rglob("*.py"):
        folder = str(path.parent.relative_to(PACKAGE))
        sizes[folder] = sizes.get(folder, 0) + len(path.read_text().splitlines())
    return sizes


def test_no_function_over_80_lines():
    over = {key: v for key, v in function_sizes().items() if v[0] > MAX_FUNCTION_LINES}
    new = sorted(f"{rel}::{key.split('::')[1]} ({n} lines)" for key, (n, rel) in over.items()
                 if key not in ALLOWED_FUNCTIONS)
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines: {new}; split them"


def test_no_folder_over_2000_lines():
    over = {f: n for f, n in folder_sizes().items() if n > MAX_FOLDER_LINES}
    new = sorted(f"grass_index/{f} ({n} lines)" for f, n in over.items()
                 if f not in ALLOWED_FOLDERS)
    assert not new, f"folders over {MAX_FOLDER_LINES} lines: {new}; split them by what they do"


def test_allowlists_hold_only_offenders():
    functions, folders = function_sizes(), folder_sizes()
    stale = [key for key in ALLOWED_FUNCTIONS
             if functions.get(key, (0, ""))[0] <= MAX_FUNCTION_LINES]
    stale += [f"{f}/" for f in ALLOWED_FOLDERS if folders.get(f, 0) <= MAX_FOLDER_LINES]
    assert not stale, f"{stale} no longer over the limit: remove them from the allowlists"


def test_the_measure_sees_nested_and_method_definitions():
    """The walk names methods by class and nested functions by their parent."""
    sizes = function_sizes()
    assert "sketcher.py::GradientSketcher.sketch" in sizes
    assert "fit.py::_grabber.grab" in sizes


if __name__ == "__main__":
    for folder, n in sorted(folder_sizes().items(), key=lambda kv: -kv[1]):
        print(f"{n:6d}  grass_index/{folder}")
    print()
    for key, (n, rel) in sorted(function_sizes().items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"{n:6d}  {rel}::{key.split('::')[1]}")
