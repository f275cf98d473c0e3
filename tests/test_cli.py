"""The grass-index command line: round trip and bad-input handling (one line, exit != 0)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from _tiny_task import write_task
from grass_index.cli.main import app

runner = CliRunner()

SMALL = ["--sparsification", "random_mask-4*3", "--projection", "sjlt-8", "--batch-size", "8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(res, *needles):
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(
        res.exception, SystemExit), res.output
    err = " ".join(res.stderr.split())
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    task = write_task(d)
    out = d / "idx"
    res = invoke("build", task, "--out", out, *SMALL)
    assert res.exit_code == 0, res.output
    return task, out


def test_round_trip_build_info_query_score_verify(built, tmp_path):
    task, out = built
    info = invoke("info", out, "--json")
    assert info.exit_code == 0, info.output
    cfg = json.loads(info.stdout)["config"]
    assert cfg["task"] == str(task.resolve()) and cfg["n_train"] == 40
    assert cfg["layout"] == {"0": 8, "2": 8}
    assert {d["name"] for d in cfg["layer_dims"]} == {"0", "2"}

    q = invoke("query", out, "--task", task, "--example", 1, "--example", 4, "--top-k", 5,
               "--opponents", "--json")
    assert q.exit_code == 0, q.output
    doc = json.loads(q.stdout)
    assert [r["example"] for r in doc["results"]] == [1, 4]
    s = invoke("score", out, "--task", task, "--out", tmp_path / "s.npy")
    assert s.exit_code == 0, s.output
    scores = np.load(tmp_path / "s.npy")
    assert scores.shape == (6, 40)
    for r in doc["results"]:
        row = scores[r["example"]]
        assert [p["train_id"] for p in r["proponents"]] == list(np.argsort(-row)[:5])
        assert [p["train_id"] for p in r["opponents"]] == list(np.argsort(row)[:5])
        np.testing.assert_allclose([p["score"] for p in r["proponents"]], np.sort(row)[::-1][:5],
                                   rtol=1e-5, atol=1e-7)

    v = invoke("verify", out, "--json")
    assert v.exit_code == 0, v.output
    assert json.loads(v.stdout)["ok"]
    human = invoke("info", out)
    assert human.exit_code == 0 and "sjlt-8" in human.stdout


def test_index_options_recall_in_info_and_bad_index(built, tmp_path):
    """--index ivf:fp16,shards=2 builds two fp16 files; info shows the recall it measured;
    a bad --index is one clean line naming the choices, before anything is written."""
    task, _ = built
    out = tmp_path / "idx"
    res = invoke("build", task, "--out", out, *SMALL, "--index", "ivf:fp16,shards=2")
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("index-*-of-2.faiss"))) == 2
    human = " ".join(invoke("info", out).stdout.split())
    assert "ivf:fp16,shards=2, 40 vectors in 2 files" in human and "recall@10" in human, human
    assert json.loads(invoke("verify", out, "--json").stdout)["ok"]
    bad = invoke("build", task, "--out", tmp_path / "bad", *SMALL, "--index", "hnsw")
    assert_clean_failure(bad, "unknown index 'hnsw'", "ivf:fp16,shards=4")
    assert not (tmp_path / "bad").exists()


def test_query_png(built, tmp_path):
    task, out = built
    res = invoke("query", out, "--task", task, "--example", 0, "--opponents", "-k", 3, "--png",
                 tmp_path / "q.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_missing_function(tmp_path):
    res = invoke("build", write_task(tmp_path, drop="loss"), "--out", tmp_path / "o", *SMALL)
    assert_clean_failure(res, "missing loss()")
    assert not (tmp_path / "o").exists()


def test_task_file_not_found(tmp_path):
    assert_clean_failure(invoke("build", tmp_path / "nope.py", "--out", tmp_path / "o"),
                         "not found")


def test_scalar_loss(tmp_path):
    res = invoke("build", write_task(tmp_path, reduction="mean"), "--out", tmp_path / "o", *SMALL)
    assert_clean_failure(res, "one loss per example", "reduction='none'")
    assert not (tmp_path / "o").exists()


def test_unknown_layers_pattern(tmp_path):
    res = invoke("build", write_task(tmp_path), "--out", tmp_path / "o", "--layers", "0.*,fc9.*",
                 *SMALL)
    assert_clean_failure(res, "'fc9.*' matches no parameter")


def test_nan_gradients_name_example_and_layer(tmp_path):
    task = write_task(tmp_path, poison="x[11, 0] = float('nan') if n == 40 else 0.0")
    res = invoke("build", task, "--out", tmp_path / "o", *SMALL)
    assert_clean_failure(res, "training example 11", "layer")


def test_out_dir_with_different_build(built):
    task, out = built
    res = invoke("build", task, "--out", out, *SMALL[:4], "--batch-size", "4")
    assert_clean_failure(res, "holds a different build", "batch_size")


def test_out_dir_not_ours(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "thesis.tex").write_text("x")
    res = invoke("build", write_task(tmp_path), "--out", tmp_path / "o", *SMALL)
    assert_clean_failure(res, "not empty")


def test_wrong_shaped_query_input(built, tmp_path):
    task, out = built
    np.savez(tmp_path / "q.npz", x=np.zeros((2, 5), np.float32), y=np.zeros(2, np.int64))
    res = invoke("query", out, "--task", task, "--input", tmp_path / "q.npz")
    assert_clean_failure(res, "expected shape [6], got [5]")
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 6)), y=np.zeros(2, np.int64))
    ok = invoke("query", out, "--task", task, "--input", tmp_path / "ok.npz", "--json")
    assert ok.exit_code == 0


def test_example_out_of_range(built):
    task, out = built
    assert_clean_failure(invoke("query", out, "--task", task, "--example", 99), "out of range")


def test_not_an_index(tmp_path):
    assert_clean_failure(invoke("query", tmp_path), "not a grass-index index")
    assert_clean_failure(invoke("info", tmp_path / "missing"), "not found")


def test_corrupted_and_truncated_index_dir(tmp_path):
    task = write_task(tmp_path)
    out = tmp_path / "idx"
    assert invoke("build", task, "--out", out, *SMALL, "--index", "flat:faiss").exit_code == 0
    faiss_file = next(out.glob("index-*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])  # truncated
    assert_clean_failure(invoke("query", out, "--task", task), "verify", "--repair")
    v = invoke("verify", out)  # the report on stdout, exit 1
    assert v.exit_code == 1 and "faiss vs lmdb" in " ".join(v.stdout.split()), v.output
    fixed = invoke("verify", out, "--repair")
    assert fixed.exit_code == 0, fixed.output
    assert invoke("query", out, "--task", task, "--json").exit_code == 0

    cfg = out / "config.json"
    cfg.write_text(cfg.read_text().replace('"seed": 0', '"seed": 1'))  # tampered
    assert_clean_failure(invoke("query", out, "--task", task), "config hash mismatch")
    cfg.write_text(cfg.read_text()[:50])  # truncated JSON
    assert_clean_failure(invoke("info", out), "corrupted")
    cfg.unlink()  # an unfinished build
    assert_clean_failure(invoke("query", out, "--task", task), "not finished", "re-run")
    info = invoke("info", out, "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["complete"] is False


# ============================================================================================
# Output and messages (issue 20 §6, "realdata"): results on stdout, logs on stderr; training
# text shown as text; checks before the work; a README grammar that parses.
# ============================================================================================

HOSTILE_LABEL = "[/] [bold]x\x1b]0;pwned\x07\x1b[2J"


def labelled_task(directory):
    """The tiny task with label(item) returning text a corpus line could hold: rich markup
    ('[/]' crashed self-influence) and terminal control sequences (title, clear screen)."""
    task = write_task(directory, "labelled.py")
    task.write_text(task.read_text() + f"\ndef label(item):\n    return {HOSTILE_LABEL!r}\n")
    return task


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    d = tmp_path_factory.mktemp("labelled")
    task = labelled_task(d)
    res = invoke("build", task, "--out", d / "idx", *SMALL)
    assert res.exit_code == 0, res.output
    return task, d / "idx"


@pytest.mark.parametrize("command,result", [
    (["query", "{out}", "--task", "{task}", "--opponents"], "top proponents"),
    (["self-influence", "{out}", "--task", "{task}"], "highest self-influence"),
    (["info", "{out}"], "sketch dim"),
    (["verify", "{out}"], "index is consistent"),
    (["build", "{task}", "--check", *SMALL], "capture check"),
    (["plan", "{task}"], "fits here"),
])
def test_results_go_to_stdout_and_logs_to_stderr(labelled, command, result):
    task, out = labelled
    res = invoke(*[str(a).format(task=task, out=out) for a in command])
    assert res.exit_code == 0, res.output
    assert result in res.stdout and result not in res.stderr, (res.stdout, res.stderr)
    if command[0] == "query":
        assert "ms per example" in res.stderr and "ms per example" not in res.stdout


def test_build_prints_its_summary_on_stdout_and_the_hint_on_stderr(tmp_path):
    task = write_task(tmp_path)
    res = invoke("build", task, "--out", tmp_path / "idx", *SMALL)
    assert res.exit_code == 0, res.output
    assert "built" in res.stdout and "layers" in res.stdout and "next:" not in res.stdout
    assert "next: grass-index query" in res.stderr and "plan:" in res.stderr


@pytest.mark.parametrize("command", [["self-influence"], ["query", "--opponents"],
                                     ["query", "--json"]])
def test_training_text_is_shown_as_text_never_as_markup_or_terminal_control(labelled,
                                                                            command):
    task, out = labelled
    res = invoke(command[0], out, "--task", task, *command[1:])
    assert res.exit_code == 0, res.output  # '[/]' crashed self-influence with a MarkupError
    shown = res.stdout + res.stderr
    assert "\x1b" not in shown and "\x07" not in shown
    if "--json" in command:
        assert json.loads(res.stdout)["results"][0]["label"] == HOSTILE_LABEL  # data, intact
    else:
        assert "[/] [bold]x\\x1b]0;pwned\\x07\\x1b[2J" in res.stdout, res.stdout


def test_query_json_reports_the_task_that_ran(labelled, tmp_path):
    task, out = labelled
    other = tmp_path / "same_task_elsewhere.py"
    other.write_text(task.read_text())
    res = invoke("query", out, "--task", other, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["task"] == str(other.resolve()) and doc["recorded_task"] == str(task.resolve())


def test_png_into_a_missing_folder_fails_before_the_work(labelled, tmp_path, monkeypatch):
    task, out = labelled
    import grass_index.attribute as attribute

    def no_work(*a, **k):
        raise AssertionError("the query ran before --png was checked")
    monkeypatch.setattr(attribute.AttributionIndex, "query_sketches", no_work)
    res = invoke("query", out, "--task", task, "--png", tmp_path / "missing" / "q.png")
    assert_clean_failure(res, "--png", "does not exist", "create it first")


def test_every_index_spelling_in_the_readme_parses_and_both_separators_agree():
    import re
    from pathlib import Path

    from grass_index import parse_spec as _  # noqa: F401  (the compression grammar)
    from grass_index.index import parse_spec

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    spellings = {s for s in re.findall(r"--index\s+([a-z][\w:,=.]*)", readme)
                 if s != "flat|ivf" and s == s.lower()}  # not placeholders such as budget=MB
    assert spellings, "the README shows --index examples"
    for s in spellings:
        parse_spec(s)
    assert parse_spec("flat,shards=3") == parse_spec("flat:shards=3")
    assert str(parse_spec("ivf,fp16,shards=4")) == str(parse_spec("ivf:fp16,shards=4"))


def test_ekfac_suggestion_for_a_projected_spec_builds(tmp_path):
    import re
    import shlex

    task = write_task(tmp_path)
    res = invoke("build", task, "--out", tmp_path / "bad", "--hessian", "ekfac",
                 "--batch-size", "8")  # the default spec: random_mask-128*128 + sjlt-4096
    err = " ".join(res.stderr.split())
    assert_clean_failure(res, "needs projection 'identity'")
    fix = re.search(r"use (--sparsification \S+ --projection \S+)", err).group(1)
    assert "128" not in fix  # EK-FAC's dense k x k inverse: k = A*B kept small
    ok = invoke("build", task, "--out", tmp_path / "ok", "--hessian", "ekfac",
                "--batch-size", "8", *shlex.split(fix))
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("call,needle", [
    (lambda gi, t: gi.open_index(None), "open_index: path must be an index directory"),
    (lambda gi, t: gi.build_index(t.model(), t.train_data(), t.loss, out=None,
                                  progress=False), "build_index: out must be a directory"),
    (lambda gi, t: gi.build_shard(t.model(), t.train_data(), t.loss, "x", "0/2",
                                  {"projection": "sjlt-8"}, progress=False),
     "build_shard: options must be a grass_index.BuildOptions"),
    (lambda gi, t: gi.build_shard(t.model(), t.train_data(), t.loss, "x", "0/2", None,
                                  "flat", progress=False),
     "index_options must be a grass_index.IndexOptions"),
    (lambda gi, t: gi.verify_index(None), "verify_index: path must be"),
])
def test_python_api_arguments_of_the_wrong_type_are_one_clear_error(tmp_path, call, needle):
    import grass_index as gi

    t = gi.load_task(str(write_task(tmp_path)))
    with pytest.raises(gi.GrassIndexError, match=needle) as e:
        call(gi, t)
    assert isinstance(e.value, TypeError)  # callers that caught TypeError still do


def test_library_errors_use_the_callers_spelling(built):
    """The same refusal names --task on the command line and task= from Python."""
    import grass_index as gi

    _, out = built
    with pytest.raises(gi.GrassIndexError) as e:
        gi.run_eval(out)
    assert "task='FILE'" in str(e.value) and "--task" not in str(e.value)
    res = invoke("eval", out)
    assert_clean_failure(res, "--task FILE")
    assert "task='FILE'" not in res.stderr
