"""The API reference (docs/api.md) from the docstrings of the public names.

    python docs/gen_api.py > docs/api.md

Every name in ``grass_index.__all__`` gets its signature and docstring, classes their public
methods and properties too, grouped by the package that defines them (in data-flow order).
``inspect`` does the reading; the output depends only on the code (no addresses, no dates),
so tests/test_apidoc.py can regenerate it and compare. A client of the public API (like the
CLI), kept beside the file it writes rather than in the package.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys

import grass_index

ORDER = ["attribute", "pipeline", "indexdir", "query", "build", "capture", "compress", "maskfit",
         "task", "tasks", "eval", "errors", "ops", ""]  # packages in this order, then others
_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-f]+>")


def _text(doc: str | None) -> str:
    """A docstring as Markdown: code spans kept, ``*`` and ``<`` outside them escaped (a spec
    like ``128*128`` in prose would otherwise start emphasis)."""
    if not doc:
        return "*(no docstring)*"
    out, last = [], 0
    for m in _CODE.finditer(doc):
        out.append(_escape(doc[last:m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(_escape(doc[last:]))
    return "".join(out)


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")


class _Raw(str):
    """An annotation kept as source text (``from __future__ import annotations``): shown
    without the quotes its repr would add."""

    def __repr__(self) -> str:
        return str(self)


def _unquoted(annotation):
    if isinstance(annotation, str):
        return _Raw(annotation.strip("'\""))
    return annotation


def _signature(obj, name: str, drop_first: bool = False) -> str:
    """``name(params) -> return``, one parameter a line when it would not fit in 90."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = [p.replace(annotation=_unquoted(p.annotation)) for p in sig.parameters.values()]
    if drop_first and params and params[0].name in ("self", "cls"):
        params = params[1:]
    sig = sig.replace(parameters=params, return_annotation=_unquoted(sig.return_annotation))
    text = name + _ADDRESS.sub(r"<\1>", str(sig))
    if len(text) <= 90:
        return text
    parts = [_ADDRESS.sub(r"<\1>", str(p)) for p in sig.parameters.values()]
    tail = str(sig).rsplit(")", 1)[1]
    return name + "(\n" + "".join(f"    {p},\n" for p in _starred(parts, sig)) + ")" + tail


def _starred(parts: list[str], sig: inspect.Signature) -> list[str]:
    """The parameters with the bare ``*`` (keyword-only marker) and ``/`` put back."""
    out, kinds = [], [p.kind for p in sig.parameters.values()]
    for i, (text, kind) in enumerate(zip(parts, kinds)):
        if kind is inspect.Parameter.KEYWORD_ONLY and (i == 0 or kinds[i - 1] not in (
                inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_POSITIONAL)):
            out.append("*")
        out.append(text)
        if kind is inspect.Parameter.POSITIONAL_ONLY and (
                i + 1 == len(kinds) or kinds[i + 1] is not inspect.Parameter.POSITIONAL_ONLY):
            out.append("/")
    return out


def _package(obj) -> str:
    """The grass_index subpackage defining ``obj`` ("" for the package itself)."""
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", None) or "grass_index"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "grass_index" else ""


def _members(cls) -> list[tuple[str, object]]:
    """Public methods and properties a grass_index class defines (or inherits from one)."""
    seen: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("grass_index"):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and (callable(value) or isinstance(
                    value, (property, staticmethod, classmethod))):
                seen[name] = value
    return list(seen.items())


def _member(cls_name: str, name: str, value) -> list[str]:
    if isinstance(value, property):
        return [f"#### `{cls_name}.{name}` (property)", "", _text(inspect.getdoc(value)), ""]
    func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    sig = _signature(func, name, drop_first=not isinstance(value, staticmethod))
    return [f"#### `{cls_name}.{name}`", "", "```python", sig, "```", "",
            _text(inspect.getdoc(func)), ""]


def _entry(name: str, obj) -> list[str]:
    """One public name: heading, signature, docstring (and a class's members)."""
    if inspect.ismodule(obj):
        return [f"### `{name}` (module)", "", _text(inspect.getdoc(obj)), ""]
    if not callable(obj):
        return [f"### `{name}`", "", f"`{obj!r}`", ""]
    lines = [f"### `{name}`", ""]
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        bases = ", ".join(b.__name__ for b in obj.__bases__)
        return lines + [f"*exception* (bases: {bases})", "", _text(inspect.getdoc(obj)), ""]
    kind = "class " if inspect.isclass(obj) else ""
    lines += ["```python", kind + _signature(obj, name), "```", "", _text(inspect.getdoc(obj)), ""]
    if inspect.isclass(obj):
        for member, value in _members(obj):
            lines += _member(name, member, value)
    return lines


def _sections() -> dict[str, list[str]]:
    """{package: its public names, in __all__ order}, packages in ORDER then the rest."""
    groups: dict[str, list[str]] = {}
    for name in grass_index.__all__:
        groups.setdefault(_package(getattr(grass_index, name)), []).append(name)
    rank = {p: i for i, p in enumerate(ORDER)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def render() -> str:
    """docs/api.md, whole."""
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py > docs/api.md` "
             "(tests/test_apidoc.py keeps it current). Every name below is importable as "
             "`grass_index.NAME`; the README's Python API section is the guide.", ""]
    for package, names in _sections().items():
        title = "grass_index" + (f".{package}" if package else "")
        intro = (inspect.getdoc(importlib.import_module(title)) or "").split("\n\n")[0]
        lines += [f"## {title}", "", _text(intro), ""]
        lines += ["Names: " + ", ".join(f"`{n}`" for n in names), ""]
        for name in names:
            lines += _entry(name, getattr(grass_index, name))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
