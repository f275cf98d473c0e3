"""Compressors on real per-sample gradients: a small MLP and a tiny random-init Llama.

Exactness: with identity factors the factored sketch IS the flattened per-sample gradient
(row-major, bias column last), even though the d_out x d_in matrix is never formed.
JL: sketches' inner products approximate the exact ones, better as k grows.
"""
import math

import pytest
import torch
from torch import nn

from grass_index.compress import FactGraSS, GraSS, LoGra, make_compressor

torch.manual_seed(0)


def capture(model, layers, run):
    """Run ``run()`` (forward + backward of a summed per-example loss); return each layer's
    input x [B, T, d_in] and output gradient grad_out [B, T, d_out]."""
    store, handles = {}, []
    for name, layer in layers.items():
        def fwd(mod, inp, out, name=name):
            store[name, "x"] = inp[0].detach()
            out.register_hook(lambda g: store.__setitem__((name, "g"), g.detach()))
        handles.append(layer.register_forward_hook(fwd))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: (store[n, "x"], store[n, "g"]) for n in layers}


def per_example_grads(model, loss_fn, batch, n):
    """Exact per-sample gradients by a loop: {param_name: [n, *shape]}."""
    out = {name: [] for name, _ in model.named_parameters()}
    for i in range(n):
        model.zero_grad()
        loss_fn(model, batch[i:i + 1]).sum().backward()
        for name, p in model.named_parameters():
            out[name].append(p.grad.detach().clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


def jl_error(S, G):
    """Mean over pairs of |<S_i,S_j> - <G_i,G_j>| / (|G_i||G_j|)."""
    K = G.double() @ G.double().T
    norm = K.diag().sqrt()
    return float(((S.double() @ S.double().T - K).abs() / torch.outer(norm, norm)).mean())


# ---------------------------------------------------------------- MLP

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(48, 96), nn.Linear(96, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_loss(model, batch):
    x, y = batch[:, :-1], batch[:, -1].long()
    return nn.functional.cross_entropy(model(x), y, reduction="none")


@pytest.fixture(scope="module")
def mlp_data():
    torch.manual_seed(0)
    model = MLP()
    n = 16
    batch = torch.cat([torch.randn(n, 48), torch.randint(0, 10, (n, 1)).float()], 1)
    caps = capture(model, {"fc1": model.fc1, "fc2": model.fc2},
                   lambda: mlp_loss(model, batch).sum().backward())
    model.zero_grad()
    # exact per-sample gradients with torch.func
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, b):
        logits = torch.func.functional_call(model, p, (b[None, :-1],))
        return nn.functional.cross_entropy(logits, b[None, -1].long())

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0))(params, batch)
    return model, caps, grads


def with_bias(grads, name):
    """[W | b] per sample, flattened row-major: what a layer with a ones column in x has."""
    return torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][..., None]], -1).flatten(1)


def ones_col(x):
    return torch.cat([x, torch.ones_like(x[..., :1])], -1)


@pytest.mark.parametrize("spars,proj,clamp", [
    ("random_mask-4096*4096", "sjlt-1000000", True),
    ("identity-49*96", "identity", False),
])
def test_mlp_identity_factors_equal_exact_gradient(mlp_data, spars, proj, clamp):
    _, caps, grads = mlp_data
    x, g = caps["fc1"]
    c = FactGraSS(49, 96, spars, proj, clamp=clamp)
    torch.testing.assert_close(c(ones_col(x), g), with_bias(grads, "fc1"), rtol=1e-4, atol=1e-6)


def test_mlp_materialized_path_equals_flat(mlp_data):
    _, caps, grads = mlp_data
    x, g = caps["fc2"]
    lin = make_compressor("random_mask-600", "sjlt-100", d_in=97, d_out=10, seed=3)
    flat = make_compressor("random_mask-600", "sjlt-100", d=970, seed=3)
    torch.testing.assert_close(lin(ones_col(x), g), flat(with_bias(grads, "fc2")), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["normal-{k}", "rademacher-{k}", "sjlt-{k}", "fjlt-{k}", "grass-{k}"])
def test_mlp_jl_full_gradient(mlp_data, spec):
    # Stated tolerance for real gradients: mean normalised error <= 2/sqrt(k), shrinking >= 2x
    # from k=256 to k=4096 (theory: 4x).
    _, _, grads = mlp_data
    G = torch.cat([g.flatten(1) for g in grads.values()], 1)   # [16, 5770]
    errs = [jl_error(make_compressor(spec.format(k=k), "identity", d=G.shape[1], seed=1)(G), G)
            for k in (256, 4096)]
    assert errs[0] <= 2 / math.sqrt(256) and errs[1] <= 2 / math.sqrt(4096), errs
    assert errs[1] < errs[0] / 2, errs


# ---------------------------------------------------------------- tiny transformer

def lm_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(1)


@pytest.fixture(scope="module")
def llama_data():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    n, T = 8, 12
    ids = torch.randint(0, 64, (n, T))
    layers = {"up": model.model.layers[0].mlp.up_proj, "q": model.model.layers[1].self_attn.q_proj}
    caps = capture(model, layers, lambda: lm_loss(model, ids).sum().backward())
    grads = per_example_grads(model, lm_loss, ids, n)
    return model, caps, grads


def test_llama_identity_factors_equal_exact_gradient(llama_data):
    _, caps, grads = llama_data
    for name, param in (("up", "model.layers.0.mlp.up_proj.weight"), ("q", "model.layers.1.self_attn.q_proj.weight")):
        x, g = caps[name]
        d_out, d_in = grads[param].shape[1:]
        c = make_compressor("random_mask-512*512", "sjlt-100000", d_in=d_in, d_out=d_out, clamp=True)
        assert c.describe()["projection"] == "identity"
        torch.testing.assert_close(c(x, g), grads[param].flatten(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda k: LoGra(64, 128, f"normal-{int(math.sqrt(k))}*{int(math.sqrt(k))}"),
    lambda k: LoGra(64, 128, f"sjlt-{int(math.sqrt(k))}*{int(math.sqrt(k))}"),
    lambda k: FactGraSS(64, 128, "random_mask-64*128", f"sjlt-{k}"),   # keeps everything: pure SJLT
    lambda k: FactGraSS(64, 128, "fjlt-64*128", f"sjlt-{k}", seed=2),
], ids=["logra-normal", "logra-sjlt", "factgrass-fullmask", "factgrass-fjlt"])
def test_llama_jl_factored(llama_data, make):
    _, caps, grads = llama_data
    x, g = caps["up"]
    G = grads["model.layers.0.mlp.up_proj.weight"].flatten(1)
    errs = [jl_error(make(k)(x, g), G) for k in (256, 4096)]
    # Looser than flat (3/sqrt(k)): a Kronecker-structured sketch of a low-rank (T=12) gradient
    # concentrates more slowly than an i.i.d. one (measured: LoGra normal 0.088 -> 0.031).
    assert errs[0] <= 3 / math.sqrt(256) and errs[1] <= 3 / math.sqrt(4096), errs
    assert errs[1] < errs[0] / 2, errs


def test_llama_factgrass_masking_is_unbiased(llama_data):
    # A real mask (keeps 1/4 of each factor): its error is set by k', not k. Averaging sketches'
    # Gram matrices over seeds must converge to the exact one (unbiased estimator).
    _, caps, grads = llama_data
    x, g = caps["up"]
    G = grads["model.layers.0.mlp.up_proj.weight"].flatten(1)
    grams = []
    for seed in range(24):
        S = FactGraSS(64, 128, "random_mask-32*64", "sjlt-2048", seed=seed)(x, g).double()
        grams.append(S @ S.T)
    one = jl_error(FactGraSS(64, 128, "random_mask-32*64", "sjlt-2048")(x, g), G)
    K = G.double() @ G.double().T
    norm = K.diag().sqrt()
    avg_err = float(((torch.stack(grams).mean(0) - K).abs() / torch.outer(norm, norm)).mean())
    assert one < 0.2 and avg_err < one / 2.5, (one, avg_err)


def test_llama_jl_full_gradient_grass(llama_data):
    _, _, grads = llama_data
    G = torch.cat([g.flatten(1) for g in grads.values()], 1)   # all 82k parameters
    errs = [jl_error(GraSS(G.shape[1], f"random_mask-{4 * k}", f"sjlt-{k}", seed=4)(G), G) for k in (256, 4096)]
    # the mask keeps 1/80 .. 1/5 of a gradient whose embedding part is sparse: looser, but shrinks
    assert errs[0] <= 4 / math.sqrt(256) and errs[1] <= 4 / math.sqrt(4096), errs
    assert errs[1] < errs[0] / 2, errs
