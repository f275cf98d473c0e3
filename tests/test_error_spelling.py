"""Library errors name their fix in the caller's terms: a Python call for a Python caller
(``verify_index(DIR, repair=True)``, ``hessian='eFIM'``), the command line's flags while a CLI
command runs (``grass-index verify DIR --repair``, ``--hessian eFIM``)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import grass_index as gi
from grass_index.errors import cli_spelling, repair_command
from grass_index.store import SketchStore
from test_ensemble import N, make_models
from test_pipeline import loss_fn, make_data, make_model


def test_repair_command_is_spelled_for_the_caller():
    assert repair_command("/x/idx") == "`grass_index.verify_index('/x/idx', repair=True)`"
    assert repair_command("/x/idx", task="t.py") == (
        "`grass_index.verify_index('/x/idx', repair=True, task='t.py')`")
    with cli_spelling():
        assert repair_command("/x/idx") == "`grass-index verify /x/idx --repair`"
        assert repair_command() == "`grass-index verify DIR --repair`"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    out = tmp_path_factory.mktemp("spell") / "idx"
    gi.build_index(make_model(), make_data(20, 1), loss_fn, out,
                   sparsification="random_mask-4*3", projection="sjlt-8", batch_size=8,
                   progress=False)
    return out


@pytest.mark.parametrize("cli", [False, True])
def test_a_missing_part_of_the_exact_index_names_the_repair_as_the_caller_runs_it(index, tmp_path, cli):
    import shutil

    out = tmp_path / "idx"
    shutil.copytree(index, out)
    key = gi.open_index(out).settings.preconditioner_key
    with SketchStore.open(out / "sketches", readonly=False) as st:  # the exact scan's part
        st.delete_array(f"precond/{key}/saturated")
    q = torch.from_numpy(np.ones((1, gi.open_index(out).dim), np.float32))
    with (cli_spelling() if cli else contextlib.nullcontext()):
        with pytest.raises(gi.AttributionError) as e:
            gi.open_index(out).search(q, 3)
    msg = str(e.value)
    if cli:
        assert f"`grass-index verify {out} --repair`" in msg and "verify_index" not in msg
    else:
        assert f"grass_index.verify_index({str(out)!r}, repair=True)" in msg
        assert "--repair" not in msg


@pytest.mark.parametrize("cli", [False, True])
def test_ekfac_on_an_ensemble_names_the_hessian_as_the_caller_writes_it(tmp_path, cli):
    with (cli_spelling() if cli else contextlib.nullcontext()):
        with pytest.raises(gi.AttributionError, match="checkpoint ensemble") as e:
            gi.build_index(make_models(), make_data(N, 1), loss_fn, tmp_path / "idx",
                           sparsification="random_mask-4*3", projection="identity",
                           hessian="ekfac", batch_size=8, progress=False)
    msg = str(e.value)
    if cli:
        assert "--hessian ekfac" in msg and "--hessian eFIM" in msg and "hessian=" not in msg
    else:
        assert "hessian='ekfac'" in msg and "hessian='eFIM'" in msg and "--" not in msg


@pytest.mark.parametrize("cli", [False, True])
def test_options_in_build_errors_are_spelled_for_the_caller(tmp_path, cli):
    from grass_index.pipeline.parallel.sharding import parse_worker

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with (cli_spelling() if cli else contextlib.nullcontext()):
        with pytest.raises(gi.AttributionError) as bad_worker:
            parse_worker("two of four")
        with pytest.raises(gi.AttributionError, match="is a file") as into_file:
            gi.build_index(make_model(), make_data(8, 1), loss_fn, a_file,
                           sparsification="random_mask-4*3", projection="sjlt-8",
                           batch_size=8, progress=False)
    if cli:
        assert str(bad_worker.value).startswith("--worker 'two of four' is not of the form")
        assert "e.g. --worker 0/4" in str(bad_worker.value)
        assert str(into_file.value).startswith(f"--out {a_file} is a file")
    else:
        assert str(bad_worker.value).startswith("worker='two of four' is not of the form")
        assert "e.g. worker='0/4'" in str(bad_worker.value)
        assert str(into_file.value).startswith(f"out={str(a_file)!r} is a file")


def _hf_empty_data(tmp_path):
    from grass_index.tasks.hf_lm import read_texts

    (tmp_path / "empty.txt").write_text("\n")
    read_texts(tmp_path / "empty.txt")


def _hf_jsonl_without_field(tmp_path):
    from grass_index.tasks.hf_lm import read_texts

    (tmp_path / "d.jsonl").write_text('{"body": "x y z"}\n')
    read_texts(tmp_path / "d.jsonl")


def _hf_bad_dtype(tmp_path):
    from grass_index.tasks.hf_lm import meta_causal_lm

    meta_causal_lm(tmp_path, dtype="float8")


def _merge_without_a_build(tmp_path):
    gi.merge_shards(tmp_path, progress=False)


def _huge_damping(tmp_path):
    from grass_index.precondition.damping import parse_damping

    parse_damping("1e9")


# (what raises, the fix's CLI spelling, its Python spelling): messages whose flags were once
# hard-coded (tests/test_message_spelling.py keeps them from coming back)
CASES = {
    "hf-lm data": (_hf_empty_data, "--data ", "data "),
    "hf-lm text field": (_hf_jsonl_without_field, "with --text-field", "with text_field"),
    "hf-lm dtype": (_hf_bad_dtype, "--dtype float8: use one of", "dtype='float8': use one of"),
    "merge": (_merge_without_a_build, "(run `grass-index build TASK --out DIR --worker I/N`)",
              "(run `build_index(..., out='DIR', worker='I/N')`)"),
    "damping": (_huge_damping, "the ranking is that of --hessian identity",
                "the ranking is that of hessian='identity'"),
}


@pytest.mark.parametrize("cli", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_messages_are_spelled_for_the_caller(tmp_path, case, cli):
    make, cli_fix, py_fix = CASES[case]
    with (cli_spelling() if cli else contextlib.nullcontext()):
        with pytest.raises(gi.GrassIndexError) as e:
            make(tmp_path)
    msg = str(e.value).replace(str(tmp_path), "TMP")
    assert (cli_fix if cli else py_fix) in msg, msg
    if not cli:
        assert "--" not in msg and "`grass-index" not in msg, msg
