"""The capture check on demand (`build --check`, check_capture), what a build records about its
capture (parameters left out, layers moved to torch.func, zero-gradient layers dropped), and
the one-line error before pass 1 for a layer no route captures exactly."""
from __future__ import annotations

import json
import logging
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import grass_index as gi
from grass_index.capture import per_sample_gradients, select_layers
from grass_index.cli.main import app
from test_capture_exact import IssueModel, ids_batch, token_loss

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


class Matmul(nn.Module):
    """fc's weight is also used through a matmul: hooks see part of its gradient, so the check
    moves fc to torch.func."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc(x) + x @ self.fc.weight)


def sq_loss(model, batch):
    return model(batch).pow(2).sum(1)


def centred_loss(model, batch):
    """Couples the examples of a batch: no route gives per-example gradients."""
    y = model(batch)
    return (y - y.mean(0)).pow(2).sum(1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_check_capture_reports_routes_without_building(tmp_path):
    torch.manual_seed(0)
    data = list(torch.randn(10, 4))
    rep = gi.check_capture(Matmul().eval(), data, sq_loss)
    rows = {r["layer"]: r for r in rep.layers}
    assert rep.ok and rep.examples == 4 and not rep.failed
    assert rows["fc"]["route"] == "moved-to-flat" and rows["fc"]["status"] == "ok"
    assert "not all seen" in rows["fc"]["note"]
    assert rows["out"]["route"] == "factored" and rows["out"]["note"] == ""
    # build_index always returns an index: its old check_only= keyword points at
    # check_capture, and writes nothing
    with pytest.raises(gi.AttributionError, match=r"check_only=True\) is gone: call "
                       r"grass_index.check_capture"):
        gi.build_index(Matmul().eval(), data, sq_loss, tmp_path / "ix", check_only=True)
    assert not (tmp_path / "ix").exists()


def test_check_capture_names_failing_layers_and_their_globs():
    rep = gi.check_capture(mlp(), list(torch.randn(8, 3)), centred_loss)
    assert not rep.ok
    failed = {r["layer"]: r["exclude"] for r in rep.failed}
    assert failed == {"0": "layers='!0.*'", "2": "layers='!2.*'"}  # as a Python caller writes it
    doc = rep.to_dict()
    assert doc["ok"] is False and [r["status"] for r in doc["layers"]] == ["failed", "failed"]
    assert [r["route"] for r in doc["layers"]] == ["none", "none"]
    json.dumps(doc)  # plain JSON


def test_build_refuses_uncapturable_layer_before_pass_1(tmp_path):
    """Bad input: one error naming the layer and the glob, and no directory claimed."""
    with pytest.raises(gi.GrassIndexError) as info:
        gi.build_index(mlp(), list(torch.randn(8, 3)), centred_loss, tmp_path / "ix",
                       progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    # from Python, the fix is spelled as the argument (the CLI says --layers '!0.*')
    assert "layer 0 cannot be captured exactly" in msg and "layers='!0.*'" in msg
    assert "layers='!2.*'" in msg  # the other failing layer is named too
    assert not (tmp_path / "ix").exists()


TASK = textwrap.dedent("""
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def train_data():
        return list(torch.randn(12, 3, generator=torch.Generator().manual_seed(0)))

    def loss(model, batch):
        y = model(batch)
        return {expr}
""")


@pytest.mark.parametrize("coupled", [False, True])
def test_cli_build_check_exit_code_table_and_json(tmp_path, coupled):
    task = tmp_path / "task.py"
    expr = "(y - y.mean(0)).pow(2).sum(1)" if coupled else "y.pow(2).sum(1)"
    task.write_text(TASK.format(expr=expr))
    out = tmp_path / "ix"
    res = invoke("build", task, "--out", out, "--check")
    err = " ".join(res.stdout.split())
    assert "Traceback" not in res.output
    assert "capture check" in err and "route" in err and "status" in err
    if coupled:
        assert res.exit_code == 1, res.output
        assert "failed: layer 0 cannot be captured exactly; exclude it with --layers '!0.*'" in err
        assert "failed: layer 2" in err
    else:
        assert res.exit_code == 0, res.output
        assert "every selected layer is captured exactly" in err and "factored" in err
    res = invoke("build", task, "--out", out, "--check", "--json")
    doc = json.loads(res.stdout)
    assert res.exit_code == (1 if coupled else 0)
    assert doc["ok"] is (not coupled) and len(doc["layers"]) == 2
    if coupled:
        assert [f["exclude"] for f in doc["failed"]] == ["--layers '!0.*'", "--layers '!2.*'"]
    assert not out.exists()  # --check builds nothing


# ---------------------------------------------------------------- what a build records
def issue_data(n=10):
    return [ids_batch(1, 6, seed=i)[0] for i in range(n)]


def test_unreached_head_dropped_recorded_and_shown(tmp_path, caplog):
    torch.manual_seed(0)
    model = IssueModel().eval()
    data = issue_data()
    with caplog.at_level(logging.WARNING, logger="grass_index"):
        idx = gi.build_index(model, data, token_loss, tmp_path / "ix", projection="sjlt-16",
                             sparsification="identity", batch_size=4, progress=False)
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pass 1:")]
    assert len(ends) == 1 and "unused" in ends[0] and "layers='!unused.*'" in ends[0]
    cap = idx.config["capture"]
    assert cap["zero_gradient"] == ["unused"] == list(idx.config["preconditioner"]["dropped"])
    assert cap["left_out"]["emb.weight"].startswith("Embedding")
    assert cap["moved_to_flat"] == {}
    res = invoke("info", tmp_path / "ix")
    err = " ".join(res.stdout.split())
    assert res.exit_code == 0 and "dropped: unused: zero gradient" in err
    assert "not attributed: 5 trainable parameters:" in err and "emb.weight (Embedding" in err
    doc = json.loads(invoke("info", tmp_path / "ix", "--json").stdout)
    assert doc["config"]["capture"] == cap

    # scores equal exact dot products over the layers the loss reaches
    ih = gi.build_index(model, data, token_loss, tmp_path / "id", sparsification="identity",
                        projection="identity", hessian="identity", batch_size=4,
                        progress=False)
    assert ih.config["capture"]["zero_gradient"] == ["unused"]
    layers = [la for la in select_layers(model) if la.name != "unused"]
    g = per_sample_gradients(model, torch.stack(data), token_loss, layers)
    g = torch.cat(list(g.values()), 1).double()
    want = g[:3] @ g.T
    got = ih.score(model, data[:3], token_loss).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_moved_layer_recorded_and_shown(tmp_path):
    torch.manual_seed(0)
    idx = gi.build_index(Matmul().eval(), list(torch.randn(10, 4)), sq_loss, tmp_path / "ix",
                         sparsification="identity", projection="identity", batch_size=4,
                         progress=False)
    moved = idx.config["capture"]["moved_to_flat"]
    assert list(moved) == ["fc"] and "not all seen" in moved["fc"]
    err = " ".join(invoke("info", tmp_path / "ix").stdout.split())
    assert "moved to flat: fc: the weight's uses are not all seen" in err


def test_resumed_and_merged_builds_record_the_same(tmp_path):
    torch.manual_seed(0)
    model = IssueModel().eval()
    data = issue_data(12)
    kw = dict(sparsification="identity", projection="sjlt-16", batch_size=4, progress=False)
    ref = gi.build_index(model, data, token_loss, tmp_path / "ref", **kw).config
    # interrupted after the first batch, then resumed by a fresh run
    x4 = data[4]

    def flaky(m, batch):
        if torch.is_grad_enabled() and any(torch.equal(b, x4) for b in batch):
            raise RuntimeError("injected")
        return token_loss(m, batch)

    with pytest.raises(gi.task.TaskError):
        gi.build_index(model, data, flaky, tmp_path / "res", **kw)
    res = gi.build_index(model, data, token_loss, tmp_path / "res", **kw).config
    # two workers, then a merge
    opts = gi.BuildOptions(**{k: v for k, v in kw.items() if k != "progress"})
    for i in range(2):
        gi.build_shard(model, data, token_loss, tmp_path / "mrg", (i, 2), opts, progress=False)
    mrg = gi.merge_shards(tmp_path / "mrg", progress=False).config
    for cfg in (res, mrg):
        assert cfg["capture"] == ref["capture"]
        assert cfg["capture"]["zero_gradient"] == ["unused"]
        assert list(cfg["preconditioner"]["dropped"]) == ["unused"]
        assert cfg["left_out"] == ref["left_out"]
    assert np.isfinite(np.asarray(gi.open_index(tmp_path / "mrg").score(
        model, data[:2], token_loss))).all()


def test_an_ensemble_with_an_unreached_head_names_each_checkpoints_block(tmp_path, caplog):
    models = []
    for s in range(2):
        torch.manual_seed(s)
        models.append(IssueModel().eval())
    with caplog.at_level(logging.WARNING, logger="grass_index"):
        idx = gi.build_index(models, issue_data(), token_loss, tmp_path / "ix",
                             projection="sjlt-16", sparsification="identity", batch_size=4,
                             progress=False)
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pass 1:")]
    assert len(ends) == 1 and "c0/unused, c1/unused" in ends[0]
    assert ends[0].count("layers='!unused.*'") == 1  # one glob leaves out both blocks
    assert idx.config["capture"]["zero_gradient"] == ["c0/unused", "c1/unused"]


# ---------------------------------------------------------------- what the check proves
def _corrupt_tokens(monkeypatch, corrupt):
    """Every linear call's per-example token pairs pass through ``corrupt(x, g)`` (both
    [B, T, d]) before they are sketched: a capture that is wrong in a known way."""
    from grass_index.capture import _taps

    real = _taps.linear_tokens

    def wrong(x, g, B, layout):
        pair = real(x, g, B, layout)
        return None if pair is None else corrupt(*pair)

    monkeypatch.setattr(_taps, "linear_tokens", wrong)


def _check_tokens_batch():
    torch.manual_seed(0)
    return IssueModel().eval(), ids_batch(4, 5)


def test_check_catches_examples_swapped_by_the_capture(monkeypatch):
    """A capture that hands example i's tokens to row i+1 keeps the batch sum: only the
    per-example reference (one example's loss differentiated alone) tells it apart. Every
    hooked layer moves to torch.func and the sketches stay exact."""
    from grass_index.capture import GradientSketcher
    from grass_index.capture import check as check_mod

    model, batch = _check_tokens_batch()
    layers = select_layers(model)
    _corrupt_tokens(monkeypatch, lambda x, g: (x.roll(1, 0), g.roll(1, 0)))
    monkeypatch.setattr(check_mod, "REFERENCE_EXAMPLES", 0)  # the sum alone misses it
    blind = GradientSketcher(model, layers, sparsification="identity", projection="identity")
    blind.check(batch, token_loss)
    assert blind.route["head"] == "batch_first"
    monkeypatch.setattr(check_mod, "REFERENCE_EXAMPLES", 1)
    sk = GradientSketcher(model, layers, sparsification="identity", projection="identity")
    sk.check(batch, token_loss)
    rows = {r["layer"]: r for r in sk.check_report()}
    reached = [n for n in rows if n != "unused"]  # zero gradient: nothing to swap
    assert {rows[n]["route"] for n in reached} == {"moved-to-flat"}
    assert all(rows[n]["status"] == "ok" and "not all seen" in rows[n]["note"] for n in reached)
    exact = per_sample_gradients(model, batch, token_loss, layers)
    want = torch.cat([exact[layer.name] for layer in layers], 1).float()
    torch.testing.assert_close(sk.sketch(batch, token_loss), want, atol=1e-5, rtol=1e-4)


def test_check_catches_a_wrong_example_beside_the_reference(monkeypatch):
    """Example 1 (not the reference example) captured twice over: the batch sum shows it."""
    model, batch = _check_tokens_batch()
    _corrupt_tokens(monkeypatch, lambda x, g: (x, g * torch.tensor([1.0, 2.0, 1.0, 1.0])[
        :, None, None]))
    rep = gi.check_capture(model, list(batch), token_loss,
                           gi.BuildOptions(sparsification="identity", projection="identity"))
    rows = {r["layer"]: r for r in rep.layers}
    assert rep.ok and rows["head"]["route"] == "moved-to-flat"
    assert "sum rel. err" in rows["head"]["note"]


def test_coupling_before_every_captured_layer_fails():
    """Inputs centred over the batch before the first layer: in the batch's own forward one
    example's loss depends on no other example's layer outputs, so only a reference taken
    from the example alone shows the coupling; no route is exact and every layer fails."""
    torch.manual_seed(0)
    net = mlp()
    centred_input = lambda m, b: m(b - b.mean(0)).pow(2).sum(1)  # noqa: E731
    rep = gi.check_capture(net, list(torch.randn(8, 3)), centred_input)
    assert {r["layer"]: r["status"] for r in rep.layers} == {"0": "failed", "2": "failed"}


def test_conv1d_gradient_sketched_as_tokens_equals_the_flattened_one():
    """The check sketches an HF Conv1D's formed gradient as d_in tokens (no transposed copy):
    the same sketch as flattening it in the capture convention, for every compressor kind."""
    tr = pytest.importorskip("transformers")
    from grass_index.capture import GradientSketcher
    from grass_index.capture._batch import per_example_grads
    from grass_index.capture.check import _sketch_grads
    from grass_index.capture.exact import flatten_layer

    torch.manual_seed(0)
    cfg = tr.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=17, n_positions=8,
                        attn_implementation="eager")
    model = tr.GPT2LMHeadModel(cfg).eval()
    layers = select_layers(model)
    loss = lambda m, ids: m(input_ids=ids).logits.pow(2).mean((1, 2))  # noqa: E731
    ids = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(1))
    grads = per_example_grads(model, ids, loss, [p for x in layers for p in x.param_names],
                              method="loop")
    for sp, proj in [("random_mask-4*4", "sjlt-8"), ("normal-4*4", "identity"),
                     ("identity", "identity")]:
        sk = GradientSketcher(model, layers, sparsification=sp, projection=proj)
        for layer in layers:
            torch.testing.assert_close(
                _sketch_grads(sk, layer, grads),
                sk._compress_formed(layer, flatten_layer(model, layer, grads)),
                rtol=1e-5, atol=1e-6)


def test_an_all_hooked_check_does_not_import_torch_dynamo():
    """The reference runs as a plain forward + backward: importing torch.func's machinery
    (torch._dynamo) cost more than the rest of the check on the digits MLP."""
    import subprocess
    import sys

    code = ("import sys, torch, grass_index as gi\n"
            "from torch import nn\n"
            "net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()\n"
            "rep = gi.check_capture(net, list(torch.randn(8, 3)),\n"
            "                       lambda m, b: m(b).pow(2).sum(1))\n"
            "assert rep.ok, rep.to_dict()\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'none')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "none"
