"""docs/api.md is generated from the docstrings (docs/gen_api.py) and kept current:
regenerated here and compared, so a changed signature or docstring shows up as a stale file."""
import importlib.util
import inspect
from pathlib import Path

import grass_index

DOCS = Path(__file__).resolve().parent.parent / "docs"
API_MD = DOCS / "api.md"
_spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
_apidoc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_apidoc)


def test_api_reference_is_current():
    assert API_MD.read_text() == _apidoc.render(), (
        "docs/api.md is stale: run `python docs/gen_api.py > docs/api.md`")


def test_every_public_name_and_method_is_documented():
    text = _apidoc.render()
    for name in grass_index.__all__:
        assert f"### `{name}`" in text, name
    for name, value in vars(grass_index.AttributionIndex).items():
        if not name.startswith("_") and (callable(value) or isinstance(value, property)):
            assert f"#### `AttributionIndex.{name}`" in text, name
    sig = inspect.signature(grass_index.build_index)
    assert all(f"    {p}" in text for p in sig.parameters), "a build_index parameter is missing"


def test_markdown_of_a_docstring():
    """Prose ``*`` (a spec such as 128*128) is escaped, code spans are kept as written, and
    string annotations lose their quotes."""
    assert _apidoc._text("keeps a*b, `c*d` and ``e*f``; <x>") == \
        "keeps a\\*b, `c*d` and ``e*f``; &lt;x>"

    def f(a: "int", *, b: "str | None" = None) -> "list[int]":
        """Doc."""
    assert _apidoc._signature(f, "f") == "f(a: int, *, b: str | None = None) -> list[int]"
