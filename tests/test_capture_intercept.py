"""The capture's interception is a TorchFunctionMode: it sees every use of a selected weight
on the sketching thread (F.linear in HF models, nn.MultiheadAttention's functional path, HF
Conv1D's addmm), nothing on other threads, composes with the caller's own modes, and leaves
nothing behind after an exception."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from grass_index.capture import GradientSketcher, select_layers
from grass_index.capture._intercept import Recorder

LINEAR, CONV2D = torch._C._nn.linear, torch.conv2d


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp_batch(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def sketcher(model):
    return GradientSketcher(model, select_layers(model), sparsification="identity",
                            projection="identity", seed=0)


def tiny_gpt2():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=17, n_positions=8,
                        attn_implementation="eager")
    return tr.GPT2LMHeadModel(cfg).eval()


def lm_loss(model, ids):
    logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def lm_batch(seed=0):
    return torch.randint(0, 17, (3, 6), generator=torch.Generator().manual_seed(seed))


def test_sees_mha_functional_path_and_conv1d_addmm():
    """MultiheadAttention calls F.linear from inside F.multi_head_attention_forward (a
    Python-level torch function the mode first sees whole); GPT-2's Conv1D multiplies with
    torch.addmm. Both are recorded, once per use."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8, requires_grad=True)
    rec = Recorder({id(mha.in_proj_weight): "in", id(mha.out_proj.weight): "out"})
    with rec:
        mha(x, x, x, need_weights=False)
    assert len(rec.calls["in"]) == 1 and len(rec.calls["out"]) == 1
    assert rec.calls["in"][0].x.shape == (3, 2, 8)  # sequence-first inside the functional path
    model = tiny_gpt2()
    c_attn, c_fc = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_fc
    rec = Recorder({id(c_attn.weight): "c_attn", id(c_fc.weight): "c_fc"})
    with rec:
        model(lm_batch())
    assert [c.x.shape for c in rec.calls["c_attn"]] == [(18, 8)]  # addmm's [B*T, d_in]
    assert len(rec.calls["c_fc"]) == 1 and rec.calls["c_fc"][0].op == "linear"


def test_no_global_patching_and_nothing_left_after_an_exception():
    model = MLP()
    sk = sketcher(model)
    want = sk.sketch(mlp_batch(), mlp_loss)
    seen = {}

    def failing(model, batch):
        seen["linear"] = F.linear  # inside the recording: still torch's own function
        seen["modes"] = len(_get_current_function_mode_stack())
        model(batch[0])
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        sk.sketch(mlp_batch(), failing)
    assert seen == {"linear": LINEAR, "modes": 1}
    assert F.linear is LINEAR and F.conv2d is CONV2D
    assert _get_current_function_mode_stack() == []
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(sk.sketch(mlp_batch(), mlp_loss), want)  # and it still works


def test_other_threads_are_not_recorded():
    """While one thread is inside a recording, another thread using the same weights is
    neither recorded nor under the mode."""
    model = MLP()
    sk = sketcher(model)
    want = sk.sketch(mlp_batch(), mlp_loss)
    inside, other_done = threading.Event(), threading.Event()
    other = {}

    def slow_loss(model, batch):
        inside.set()
        assert other_done.wait(30)
        return mlp_loss(model, batch)

    def other_thread():
        assert inside.wait(30)
        other["modes"] = len(_get_current_function_mode_stack())
        with torch.enable_grad():
            other["out"] = model(mlp_batch(seed=9, n=7)[0]).sum()  # different batch size
        other_done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    got = sk.sketch(mlp_batch(), slow_loss)
    t.join()
    assert other["modes"] == 0 and torch.equal(got, want)


def test_concurrent_sketching_in_a_thread_pool():
    """serve sketches in a worker thread: several threads sketching at once (the same GPT-2
    model, HF Conv1D included, and an MLP) give the serial result, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    gpt, mlp = tiny_gpt2(), MLP()
    jobs = [(gpt, lm_batch(s), lm_loss) for s in range(3)] + \
           [(mlp, mlp_batch(s), mlp_loss) for s in range(3)]
    sketchers = {id(gpt): sketcher(gpt), id(mlp): sketcher(mlp)}
    for model, batch, loss in jobs[::3]:  # the check, once per sketcher
        sketchers[id(model)].sketch(batch, loss)
    want = [sketchers[id(m)].sketch(b, loss) for m, b, loss in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda j: sketchers[id(j[0])].sketch(j[1], j[2]), jobs * 3))
    for i, g in enumerate(got):
        assert torch.equal(g, want[i % len(jobs)])


class CountLinear(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.linear = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.linear += func is LINEAR
        return func(*args, **(kwargs or {}))


def test_composes_with_the_callers_mode():
    """A mode the caller has active keeps seeing the model's calls, and the sketch is
    unchanged."""
    model = MLP()
    sk = sketcher(model)
    want = sk.sketch(mlp_batch(), mlp_loss)
    with CountLinear() as outer:
        got = sk.sketch(mlp_batch(), mlp_loss)
    assert torch.equal(got, want) and outer.linear == 2
