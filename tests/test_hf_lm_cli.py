"""`grass-index build --hf-model DIR --data FILE` and `query --text`: no task file, no env vars;
bad --data gets one line naming it."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from grass_index.cli.main import app  # noqa: E402
from grass_index.tasks import read_texts  # noqa: E402
from grass_index.task import TaskError  # noqa: E402

runner = CliRunner()
LINES = [f"note {i}: the {c} fox jumps over the {d} dog." for i, (c, d) in
         enumerate(zip(["red", "blue", "green", "brown", "grey", "pink"] * 2,
                       ["lazy", "quick", "sleepy", "happy", "small", "tall"] * 2))]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("gpt2") / "model"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(d)
    return d


def test_build_and_query_text_without_task_file(gpt2_dir, tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"body": ln, "id": i}) for i, ln in enumerate(LINES)))
    out = tmp_path / "idx"
    r = invoke("build", "--hf-model", gpt2_dir, "--data", data, "--text-field", "body",
               "--max-length", 32, "--out", out, "--sparsification", "random_mask-8*8",
               "--projection", "sjlt-32", "--batch-size", 4)
    assert r.exit_code == 0, r.output
    q = invoke("query", out, "--hf-model", gpt2_dir, "--data", data, "--text", LINES[3],
               "--top-k", 2, "--json")
    assert q.exit_code == 0, q.output
    res = json.loads(q.stdout)["results"][0]
    assert res["proponents"][0]["train_id"] == 3  # its own line, printed as text
    assert res["proponents"][0]["label"].strip() == LINES[3][:32]
    assert res["label"].strip() == LINES[3][:32]


def test_bad_data_gets_one_line(gpt2_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    nofield = tmp_path / "x.jsonl"
    nofield.write_text('{"text": "a b c"}\n{"other": "d e f"}\n')
    for path, needle in ((empty, "is empty"), (latin, "not UTF-8"),
                         (nofield, "line 2 has no field 'text'"),
                         (tmp_path / "missing.txt", "file not found")):
        with pytest.raises(TaskError, match=needle):
            read_texts(path)
        r = invoke("build", "--hf-model", gpt2_dir, "--data", path, "--out", tmp_path / "o")
        assert r.exit_code != 0 and needle in r.output and str(path.name) in r.output
        assert "Traceback" not in r.output
    r = invoke("build", "--hf-model", tmp_path, "--data", empty, "--out", tmp_path / "o")
    assert r.exit_code != 0 and "no config.json" in r.output


def test_plan_command_side_by_side(gpt2_dir, tmp_path):
    data = tmp_path / "c.txt"
    data.write_text("\n".join(LINES))
    r = invoke("plan", "--hf-model", gpt2_dir, "--data", data, "--projection", "sjlt-64",
               "--sparsification", "random_mask-8*8", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert list(doc["plans"]) == ["sjlt-64", "sjlt-32", "sjlt-16"] and doc["n"] == len(LINES)
    ks = [p["K"] for p in doc["plans"].values()]
    assert ks[0] == 2 * ks[1] == 4 * ks[2]  # 64 per layer, then 32, 16
    r = invoke("plan", "--hf-model", gpt2_dir, "--data", data)
    assert r.exit_code == 0 and "RAM peak" in r.output and "fits here" in r.output


# --- issue 20 §6 ("realdata"): a model directory without model_type, and --max-length beyond
# the model's context, are one line naming the fix (were "internal error ValueError" and "loss
# raised IndexError") ---------------------------------------------------------------------------

def test_model_dir_without_model_type_is_one_line(gpt2_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gpt2_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["model_type"]
    (broken / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "c.txt"
    data.write_text("\n".join(LINES))
    r = invoke("build", "--hf-model", broken, "--data", data, "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit)
    err = " ".join(r.stderr.split())
    assert "internal error" not in err and '"model_type"' in err and "broken" in err, err


def test_max_length_beyond_the_context_names_the_limit(gpt2_dir, tmp_path):
    from grass_index import hf_lm_task

    data = tmp_path / "c.txt"
    data.write_text("\n".join(LINES))
    r = invoke("build", "--hf-model", gpt2_dir, "--data", data, "--max-length", 65,
               "--out", tmp_path / "o")
    err = " ".join(r.stderr.split())
    assert r.exit_code == 1 and "internal error" not in err and "IndexError" not in err, err
    assert "--max-length 65 is longer than the context" in err and "--max-length 64" in err
    with pytest.raises(TaskError, match=r"max_length=65 .*give max_length=64"):
        hf_lm_task(gpt2_dir, data, max_length=65)
    hf_lm_task(gpt2_dir, data, max_length=64)  # the limit itself is fine


def test_add_to_an_hf_index_tokenizes_as_the_build_did(gpt2_dir, tmp_path):
    """`add --hf-model M --data F` takes the recorded --text-field/--max-length/--dtype (the
    build's tokenization of the indexed examples): left out, they are the recorded ones (before,
    the default max length re-tokenized every line and the add said an indexed example
    differed); given otherwise, one line names the recorded value."""
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"body": ln}) for ln in LINES[:8]) + "\n")
    out = tmp_path / "idx"
    r = invoke("build", "--hf-model", gpt2_dir, "--data", data, "--text-field", "body",
               "--max-length", 16, "--out", out, "--sparsification", "random_mask-8*8",
               "--projection", "sjlt-32", "--batch-size", 4)
    assert r.exit_code == 0, r.output
    data.write_text("\n".join(json.dumps({"body": ln}) for ln in LINES) + "\n")  # grew by 4
    bad = invoke("add", out, "--hf-model", gpt2_dir, "--data", data, "--max-length", 32)
    assert bad.exit_code != 0 and "built with --max-length 16" in bad.output, bad.output
    r = invoke("add", out, "--hf-model", gpt2_dir, "--data", data, "--json")
    assert r.exit_code == 0, r.output
    import grass_index as gi
    assert gi.open_index(out).n_train == len(LINES)
