"""Capture: hooked sketches equal the compression of exact per-sample gradients."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grass_index.capture import (CaptureError, GradientSketcher, per_sample_gradients,
                                 select_layers)
from grass_index.capture import sketcher as sketcher_mod

try:
    from grass_index.compress import make_compressor as REAL_MAKE  # noqa: F401
except ImportError:
    REAL_MAKE = None


# ---------------------------------------------------------------- a materialising test double
class _DenseSketch(nn.Module):
    """Test double of the compress contract: flatten Σ_t g_t x_tᵀ, then a seeded dense map."""

    def __init__(self, D, k, seed, identity):
        super().__init__()
        self.k = D if identity else k
        gen = torch.Generator().manual_seed(seed)
        P = torch.eye(D) if identity else torch.randn(D, k, generator=gen) / math.sqrt(k)
        self.register_buffer("P", P)

    def forward(self, x, grad_out=None):
        if grad_out is None:
            flat = x
        else:
            if x.dim() == 2:
                x, grad_out = x[:, None], grad_out[:, None]
            flat = torch.einsum("bto,bti->boi", grad_out, x).reshape(x.shape[0], -1)
        return flat @ self.P

    def describe(self):
        return {"sparsification": "identity", "projection": "test", "k": self.k, "clamped": False}


def _fake_make(sparsification, projection, *, d=None, d_in=None, d_out=None, seed=0,
               clamp=False, mask_indices=None):
    D = d if d is not None else d_in * d_out
    identity = projection == "identity"
    k = None if identity else min(int(projection.split("-")[1]), D)
    return _DenseSketch(D, k, seed, identity)


@pytest.fixture(params=["fake"] + (["real"] if REAL_MAKE else []))
def compress_impl(request, monkeypatch):
    """Run each test with the test double and, once it lands, the real compress stage."""
    if request.param == "fake":
        monkeypatch.setattr(sketcher_mod, "make_compressor", _fake_make)
        monkeypatch.setattr(sketcher_mod, "layer_seed", lambda s, n: (s * 1000003 + len(n)) % 2**31)
    return request.param


def sketch_of_exact(sk: GradientSketcher, exact: dict) -> torch.Tensor:
    """Compress exact gradients with the same compressors. A linear compressor gets G through
    x_t = e_t, g_t = G[:, :, t] (Σ_t g_t e_tᵀ = G): valid because compressors are linear."""
    parts = []
    for layer in sk.layers:
        comp, G = sk.compressors[layer.name], exact[layer.name].float()
        B = G.shape[0]
        if layer.kind == "linear":
            G = G.reshape(B, layer.d_out, layer.d_in_eff)
            x = torch.eye(layer.d_in_eff).expand(B, -1, -1)
            parts.append(comp(x, G.transpose(1, 2)))
        else:
            parts.append(comp(G))
    return torch.cat(parts, 1)


def check(model, batch, loss_fn, layers, proj="normal-16", sparse="identity", atol=1e-5):
    sk = GradientSketcher(model, layers, sparsification=sparse, projection=proj, seed=3)
    got = sk.sketch(batch, loss_fn)
    exact = per_sample_gradients(model, batch, loss_fn, layers)
    want = sketch_of_exact(sk, exact)
    assert got.shape == (want.shape[0], sk.dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    return sk, got, exact


# ---------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp_batch(B=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 5, generator=g), torch.randint(0, 3, (B,), generator=g)


class SeqModel(nn.Module):
    """Embedding -> LayerNorm -> Linear(bias) -> GELU -> Linear(no bias): [B, T, d] inputs."""

    def __init__(self, V=11, d=6):
        super().__init__()
        self.emb, self.norm = nn.Embedding(V, d), nn.LayerNorm(d)
        self.up, self.out = nn.Linear(d, 8), nn.Linear(8, V, bias=False)

    def forward(self, ids):
        return self.out(F.gelu(self.up(self.norm(self.emb(ids)))))


def seq_loss(model, batch):
    """Next-token loss averaged over real (unpadded) positions of each example."""
    ids, mask = batch["ids"], batch["mask"]
    logits = model(ids)[:, :-1]
    tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (tok * m).sum(1) / m.sum(1)


def seq_batch(B=4, T=7, V=11, pad_fill=0):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 3, 6])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    ids = torch.where(mask, ids, torch.full_like(ids, pad_fill))
    return {"ids": ids, "mask": mask}


class Shared(nn.Module):
    """One Linear applied twice per forward: its gradient is the sum over both calls."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))))


# ---------------------------------------------------------------- equality with exact gradients
def test_mlp_with_biases(compress_impl):
    torch.manual_seed(0)
    model = MLP().eval()
    layers = select_layers(model)
    assert [(l.name, l.kind, l.has_bias, l.d_in, l.d_out, l.numel) for l in layers] == [
        ("fc1", "linear", True, 5, 7, 7 * 6), ("fc2", "linear", True, 7, 3, 3 * 8)]
    check(model, mlp_batch(), mlp_loss, layers)


def test_identity_sketch_is_the_exact_gradient(compress_impl):
    torch.manual_seed(0)
    model = MLP().eval()
    layers = select_layers(model)
    sk = GradientSketcher(model, layers, sparsification="identity", projection="identity")
    got = sk.sketch(mlp_batch(), mlp_loss)
    exact = per_sample_gradients(model, mlp_batch(), mlp_loss, layers)
    torch.testing.assert_close(got, torch.cat([exact["fc1"], exact["fc2"]], 1))
    # the convention is W.grad.flatten() with the bias as the last column
    x, y = mlp_batch()
    model.zero_grad()
    mlp_loss(model, (x[2:3], y[2:3])).sum().backward()
    fc1 = torch.cat([model.fc1.weight.grad, model.fc1.bias.grad[:, None]], 1).flatten()
    torch.testing.assert_close(got[2, :42], fc1)
    model.zero_grad(set_to_none=True)


def test_sequence_model_with_padding(compress_impl):
    torch.manual_seed(0)
    model = SeqModel().eval()
    layers = select_layers(model)
    assert [l.name for l in layers] == ["up", "out"]
    _, got, _ = check(model, seq_batch(), seq_loss, layers)
    # padded positions have Dy = 0, so what sits there changes nothing
    other = GradientSketcher(model, layers, sparsification="identity", projection="normal-16",
                             seed=3).sketch(seq_batch(pad_fill=9), seq_loss)
    torch.testing.assert_close(other, got)


def test_module_called_twice_sums_its_calls(compress_impl):
    torch.manual_seed(0)
    model = Shared().eval()
    layers = select_layers(model)
    assert [l.name for l in layers] == ["fc", "head"]
    x = torch.randn(5, 3, 4)  # [B, T, d] too
    loss = lambda m, b: m(b).pow(2).sum(dim=(1, 2))  # noqa: E731
    check(model, x, loss, layers)


def test_flat_layers_by_pattern(compress_impl):
    torch.manual_seed(0)
    model = SeqModel().eval()
    layers = select_layers(model, ["emb.weight", "norm.*", "up.weight", "up.bias"])
    kinds = {l.name: l.kind for l in layers}
    assert kinds == {"emb.weight": "flat", "norm.weight": "flat", "norm.bias": "flat",
                     "up": "linear"}
    sk, _, _ = check(model, seq_batch(), seq_loss, layers)
    assert list(sk.layout) == ["emb.weight", "norm.weight", "norm.bias", "up"]
    # a bias alone is flat; the weight alone is a linear layer without bias column
    layers = select_layers(model, ["up.weight", "out.*"])
    assert [(l.name, l.kind, l.has_bias) for l in layers] == [("up", "linear", False),
                                                              ("out", "linear", False)]
    layers = select_layers(model, ["up.bias"])
    assert [(l.name, l.kind, l.numel) for l in layers] == [("up.bias", "flat", 8)]
    check(model, seq_batch(), seq_loss, layers)


def test_frozen_selected_params_and_state_are_restored(compress_impl):
    model = MLP().train()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = select_layers(model, ["*"])
    with torch.no_grad():  # capture enables grad itself
        check(model, mlp_batch(), mlp_loss, layers)
    assert model.training
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert not model.fc1._forward_hooks and not model.fc2._forward_hooks


# ---------------------------------------------------------------- transformers (tiny, random init)
def _lm_loss(model, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (tok * m).sum(1) / m.sum(1)


def _lm_batch(V):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    return {"input_ids": ids, "attention_mask": mask}


def test_tiny_gpt2_conv1d(compress_impl):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=17, n_positions=8,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = tr.GPT2LMHeadModel(cfg).eval()
    layers = select_layers(model)
    names = [l.name for l in layers]
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert (layers[0].d_in, layers[0].d_out, layers[0].has_bias) == (8, 24, True)
    # lm_head is tied to the embedding: only the pattern route (flat, exact) captures it
    flat = select_layers(model, ["lm_head.weight"])
    assert [(l.name, l.kind) for l in flat] == [("transformer.wte.weight", "flat")]
    check(model, _lm_batch(17), _lm_loss, layers + flat, atol=1e-5)


def test_tiny_llama(compress_impl):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=12,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=19,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         attn_implementation="eager")
    model = tr.LlamaForCausalLM(cfg).eval()
    layers = select_layers(model)
    assert len(layers) == 8 and layers[-1].name == "lm_head" and not layers[0].has_bias
    check(model, _lm_batch(19), _lm_loss, layers, atol=1e-5)


# ---------------------------------------------------------------- bad input
def test_scalar_loss_is_rejected(compress_impl):
    model = MLP()
    sk = GradientSketcher(model, select_layers(model), sparsification="identity",
                          projection="identity")
    with pytest.raises(CaptureError, match=r"shape \[6\]; got shape \(\).*mean"):
        sk.sketch(mlp_batch(), lambda m, b: mlp_loss(m, b).mean())
    with pytest.raises(CaptureError, match=r"one loss per example"):
        sk.sketch(mlp_batch(), lambda m, b: mlp_loss(m, b)[:3])
    assert not model.fc1._forward_hooks and all(p.grad is None for p in model.parameters())
    flat = GradientSketcher(model, select_layers(model, ["fc1.bias"]), sparsification="identity",
                            projection="identity")
    with pytest.raises(CaptureError, match=r"one loss per example"):
        flat.sketch(mlp_batch(), lambda m, b: mlp_loss(m, b).mean())


def test_unknown_pattern_lists_names():
    with pytest.raises(CaptureError, match=r"'enc\.\*' matches no parameter.*fc1\.weight"):
        select_layers(MLP(), ["fc1.weight", "enc.*"])


def test_nan_gradient_names_example_and_layer(compress_impl):
    model = MLP()
    x, y = mlp_batch()
    x[4, 0] = float("nan")
    sk = GradientSketcher(model, select_layers(model), sparsification="identity",
                          projection="normal-8")
    with pytest.raises(CaptureError, match=r"example 4 of the batch in layer fc1") as e:
        sk.sketch((x, y), mlp_loss)
    assert (e.value.example, e.value.layer) == (4, "fc1")
    assert not model.fc1._forward_hooks and not model.fc2._forward_hooks
    assert all(p.grad is None for p in model.parameters())
    flat = GradientSketcher(model, select_layers(model, ["fc2.bias"]), sparsification="identity",
                            projection="identity")
    with pytest.raises(CaptureError, match=r"example 4 .* layer fc2\.bias"):
        flat.sketch((x, y), mlp_loss)


def test_hooks_removed_when_loss_fn_raises(compress_impl):
    model = MLP()
    sk = GradientSketcher(model, select_layers(model), sparsification="identity",
                          projection="identity")

    def broken(m, b):
        m(b[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sk.sketch(mlp_batch(), broken)
    assert not model.fc1._forward_hooks and not model.fc2._forward_hooks


# ---------------------------------------------------------------- the real compress stage
@pytest.mark.skipif(REAL_MAKE is None, reason="grass_index.compress not available yet")
@pytest.mark.parametrize("sparse,proj", [("random_mask-4*4", "sjlt-16"),    # FactGraSS
                                         ("normal-3*3", "identity"),         # LoGra
                                         ("grass-8", "sjlt-6")])             # GraSS on G
def test_real_specs_match_exact(sparse, proj):
    torch.manual_seed(0)
    model = SeqModel().eval()
    layers = select_layers(model, ["emb.weight", "norm.weight", "up.*", "out.weight"])
    sk, got, _ = check(model, seq_batch(), seq_loss, layers, proj=proj, sparse=sparse)
    desc = sk.describe()
    assert desc["up"]["kind"] == "linear" and desc["up"]["k"] == sk.layout["up"]
    assert desc["emb.weight"]["requested"]["sparsification"] == sparse
    assert sum(sk.layout.values()) == sk.dim == got.shape[1]
    # same specs + seed -> same sketch; another seed -> another projection
    again = GradientSketcher(model, layers, sparsification=sparse, projection=proj, seed=3)
    torch.testing.assert_close(again.sketch(seq_batch(), seq_loss), got, rtol=0, atol=0)


class InplaceKw(nn.Module):
    """In-place ops on a hooked output and a keyword-argument call: hooks must still see Dy
    of the output as the layer produced it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 6), nn.Linear(6, 2), nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc1(input=x)
        h.mul_(2.0)
        return self.fc2(self.act(h))


def test_inplace_ops_and_keyword_inputs(compress_impl):
    torch.manual_seed(0)
    model = InplaceKw().eval()
    x = torch.randn(5, 4)
    check(model, x, lambda m, b: m(b).pow(2).sum(1), select_layers(model))


def test_loop_fallback_equals_vmap():
    from grass_index.capture._batch import per_example_grads

    torch.manual_seed(0)
    model = SeqModel().eval()
    names = [n for n, _ in model.named_parameters()]
    a = per_example_grads(model, seq_batch(), seq_loss, names, method="vmap")
    b = per_example_grads(model, seq_batch(), seq_loss, names, method="loop")
    for n in names:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_llama_sdpa_flat_norms_fall_back_to_loop(compress_impl):
    """HF's default SDPA masking has data-dependent control flow that vmap rejects; flat layers
    then use the per-example loop, and still equal the hooked linear path's exact reference."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=12,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=19,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = tr.LlamaForCausalLM(cfg).eval()
    layers = select_layers(model, ["*norm*", "*mlp.down_proj.weight"])
    assert [l.kind for l in layers] == ["linear", "flat", "flat", "flat"]
    check(model, _lm_batch(19), _lm_loss, layers, atol=1e-5)
