"""Which room may import which (docs/design.md, "Data flow and modules"), read from the source:
every import, at module level or inside a function, so no cycle hides behind a lazy import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "grass_index"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package); compiled extensions (grass_index._C) included."""
    mods = {}
    for p in PKG.rglob("*"):
        if p.suffix == ".py" or p.name.endswith((".so", ".pyd")):
            parts = list(p.relative_to(REPO).parts)
            parts[-1] = parts[-1].split(".")[0]
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


MODULES = _modules()


def _targets(module: str, is_pkg: bool, node) -> list[str]:
    """The grass_index modules one import statement names (a submodule when ``from pkg import
    sub`` names one, else the package or module the names come from)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "grass_index"]
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    elif (node.module or "").split(".")[0] == "grass_index":
        source = node.module
    else:
        return []
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
            for a in node.names]


def _imports() -> dict[str, dict[str, list]]:
    """module -> {imported module: [(line, names)]}, every import statement."""
    graph: dict[str, dict[str, list]] = {}
    for name, (path, is_pkg) in MODULES.items():
        if path.suffix != ".py":
            continue
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, is_pkg, node):
                    if target != name:
                        edges.setdefault(target, []).append(
                            (node.lineno, [a.name for a in node.names]))
    return graph


GRAPH = _imports()


def _in(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_not_even_behind_function_level_imports():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == [["a", "b", "c"]]


STAGES = ("grass_index.ops", "grass_index.compress", "grass_index.capture",
          "grass_index.precondition", "grass_index.store", "grass_index.index")
ABOVE_STAGES = ("grass_index.indexdir", "grass_index.pipeline", "grass_index.living",
                "grass_index.query",
                "grass_index.attribute", "grass_index.task", "grass_index.tasks",
                "grass_index.eval", "grass_index.analysis", "grass_index.maskfit",
                "grass_index.cli", "grass_index.serve")
FACE = "grass_index.attribute"
# room -> rooms it never imports
NEVER = {
    # the on-disk format knows nothing of how an index is built, queried or used
    "grass_index.indexdir": ("grass_index.pipeline", "grass_index.living", "grass_index.query",
                             "grass_index.task",
                             "grass_index.tasks", FACE, "grass_index.eval",
                             "grass_index.analysis", "grass_index.cli", "grass_index.serve"),
    # the query side opens what the build wrote, through indexdir; never the build itself
    "grass_index.query": ("grass_index.pipeline", "grass_index.living", FACE, "grass_index.eval",
                          "grass_index.analysis", "grass_index.cli", "grass_index.serve"),
    # the build: never the façade, the CLI, the server or what runs on finished indexes
    "grass_index.pipeline": (FACE, "grass_index.eval", "grass_index.analysis",
                             "grass_index.cli", "grass_index.serve", "grass_index.task",
                             "grass_index.tasks", "grass_index.living"),
    # a living index's changes: on top of the build (pass 1, pass 2), below the façade
    "grass_index.living": (FACE, "grass_index.eval", "grass_index.analysis",
                           "grass_index.cli", "grass_index.serve", "grass_index.task",
                           "grass_index.tasks", "grass_index.query"),
    # the user's collate and loss, called with errors that blame the task: a leaf
    "grass_index.calls": ("grass_index.task", "grass_index.tasks", "grass_index.pipeline",
                          "grass_index.indexdir", "grass_index.query", FACE),
    "grass_index.batching": ("grass_index.task", "grass_index.pipeline", "grass_index.query"),
    # the CLI calls the public API only
    "grass_index.cli": STAGES + ("grass_index.pipeline", "grass_index.indexdir",
                                 "grass_index.query", "grass_index.living"),
    # LDS and tune run on an opened index, below the façade; never capture directly
    "grass_index.eval": ("grass_index.capture",),
    "grass_index.eval.tune": (FACE, "grass_index.capture", "grass_index.pipeline"),
    "grass_index.eval.inputs": (FACE, "grass_index.capture", "grass_index.pipeline"),
    "grass_index.eval.lds": (FACE, "grass_index.capture"),
    "grass_index.eval.subsets": (FACE, "grass_index.capture"),
    "grass_index.eval.groundtruth": (FACE, "grass_index.capture"),
    "grass_index.analysis": (FACE, "grass_index.pipeline", "grass_index.capture"),
    # tasks built in code sit on top of task.py, which names them but never imports them
    "grass_index.task": ("grass_index.tasks", "grass_index.pipeline", "grass_index.indexdir",
                         "grass_index.query", FACE),
    # the façade reaches the stages only through pipeline/, query/ and indexdir/
    FACE: STAGES + ("grass_index.cli", "grass_index.serve"),
    **{stage: ABOVE_STAGES for stage in STAGES},
}
# the build's one use of the query side: repair re-sketches damaged blocks with the sketcher a
# query would use (pipeline/repair.py; query never imports pipeline, so no cycle)
ALLOWED = {("grass_index.pipeline.repair", "grass_index.query.querying")}


@pytest.mark.parametrize("room", sorted(NEVER))
def test_no_room_imports_what_the_design_forbids(room):
    bad = []
    for module, edges in GRAPH.items():
        if not _in(module, room):
            continue
        for target, where in edges.items():
            if (module, target) in ALLOWED:
                continue
            for forbidden in NEVER[room]:
                if _in(target, forbidden) and not _in(target, room):
                    bad.append(f"{module} line {where[0][0]} imports {target}")
    assert bad == []


def test_only_the_cli_and_the_server_import_the_package_root():
    """``from .. import X`` of a name (not a submodule) runs grass_index/__init__'s lazy map:
    the library takes what it needs from the module that defines it (e.g. grass_index.version);
    the CLI and the server are clients of the public API (``import grass_index as gi``)."""
    bad = [f"{m} line {where[0][0]} imports {where[0][1]} from the package root"
           for m, edges in GRAPH.items() for t, where in edges.items()
           if t == "grass_index" and not _in(m, "grass_index.cli")
           and not _in(m, "grass_index.serve") and m != "grass_index.__main__"]
    assert bad == []


def test_the_facade_imports_no_private_names():
    tree = ast.parse((PKG / "attribute.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert all(not a.name.startswith("_") for a in node.names), node.module


def test_the_rooms_exist_and_every_forbidden_room_is_real():
    """A rule naming a room that was renamed would hold vacuously."""
    for room, forbidden in NEVER.items():
        assert any(_in(m, room) for m in MODULES), room
        for f in forbidden:
            assert any(_in(m, f) for m in MODULES), f
    for module, target in ALLOWED:
        assert target in GRAPH[module], (module, target)


def test_tune_runs_below_the_facade_on_an_opened_index(tmp_path):
    """eval/tune.py never opens an index (that would import the façade back): given a path,
    it says how to open one."""
    from grass_index.eval import EvalError
    from grass_index.eval.tune import prepare

    with pytest.raises(EvalError, match=r"open_index\(DIR\)\.tune"):
        prepare(tmp_path)
