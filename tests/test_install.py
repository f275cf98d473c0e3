"""How the package is installed: FAISS from exactly one extra ([cpu] faiss-cpu, [gpu]
faiss-gpu, never a core dependency), one clear line when neither is installed, and the
README's first two lines (install + run, test) kept in step with CI."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HINT = "install grass-index[cpu] or grass-index[gpu]"
# run with the faiss module unimportable (as when neither wheel is installed)
NO_FAISS = "import sys; sys.modules['faiss'] = None; "


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_faiss_comes_from_exactly_one_extra():
    project = _project()
    extras = project["optional-dependencies"]
    assert not [r for r in project["dependencies"] if "faiss" in _name(r)]
    assert [_name(r) for r in extras["cpu"]] == ["faiss-cpu"]
    assert [_name(r) for r in extras["gpu"]] == ["faiss-gpu"]
    for name, reqs in extras.items():  # any other extra combines with either wheel
        if name not in ("cpu", "gpu"):
            assert not [r for r in reqs if "faiss" in _name(r)], name
    assert project["scripts"]["grass-index"] == "grass_index.cli:main"


def test_readme_first_lines_and_ci_agree():
    """Line 1 installs .[cpu,test] and runs the default example, line 2 is the test command;
    .ci/run installs the same extras and runs the same test command."""
    first, second = (ROOT / "README.md").read_text().splitlines()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-e ".[cpu,test]"' in first and "grass-index build" in first
    assert second == "GRASS_INDEX_REQUIRE_NATIVE=1 python3 -m pytest -q"
    assert '-e ".[cpu,test]"' in ci
    assert [line for line in ci.splitlines() if line.startswith("GRASS_INDEX_REQUIRE_NATIVE")] \
        == [second]


def _run(code: str):
    return subprocess.run([sys.executable, "-c", NO_FAISS + code], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_without_faiss_the_index_stage_says_which_extra():
    res = _run("import grass_index\n"   # the package itself stays importable
               "try:\n"
               "    import grass_index.index\n"
               "except grass_index.GrassIndexError as e:\n"
               "    assert isinstance(e, ImportError)\n"
               "    print(e)\n")
    assert res.returncode == 0, res.stderr
    assert HINT in res.stdout and len(res.stdout.strip().splitlines()) == 1


def test_without_faiss_the_cli_prints_one_line():
    res = _run("import sys; sys.argv = ['grass-index', 'info', 'nowhere']\n"
               "from grass_index.cli import main\n"
               "main()\n")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and HINT in lines[0], res.stderr
