"""Capture is exact on layers forward hooks alone get wrong: sketches with identity
compression equal torch.func per-example gradients, layer by layer, on attention, Linear
subclasses, functional and tied weights, unused heads, sequence-first layouts (also when
T == B), convolutions and tiny HF models; the cheap hooked route is used where it is exact."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grass_index.capture import GradientSketcher, per_sample_gradients, select_layers
from grass_index.capture.errors import CaptureError


def exact_check(model, batch, loss_fn, layers=None, sparse="identity", proj="identity",
                atol=1e-5, rtol=1e-4):
    """Sketch, then compare with the same compressors applied to torch.func gradients."""
    layers = layers if layers is not None else select_layers(model)
    sk = GradientSketcher(model, layers, sparsification=sparse, projection=proj, seed=1)
    got = sk.sketch(batch, loss_fn)
    exact = per_sample_gradients(model, batch, loss_fn, layers)
    if sparse == "identity" and proj == "identity":
        want = torch.cat([exact[layer.name] for layer in layers], 1).float()
    else:
        want = torch.cat([sk._compress_formed(layer, exact[layer.name]) for layer in layers], 1)
    assert got.shape == want.shape and not got.requires_grad
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return sk


def assert_no_grad(model):
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- transformer blocks
class MuLinear(nn.Linear):
    """muP-style output scale after F.linear."""

    def forward(self, x):
        return 0.25 * super().forward(x)


class ActLinear(nn.Linear):
    """An activation inside the Linear's own forward."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class IssueModel(nn.Module):
    """TransformerEncoderLayer + muP readout + a trainable head the loss never reaches."""

    def __init__(self, d=8, V=7, batch_first=True):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = MuLinear(d, V)
        self.unused = nn.Linear(d, 3)
        self.batch_first = batch_first

    def forward(self, ids):
        h = self.emb(ids)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.block(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


def token_loss(model, ids):
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def ids_batch(B, T, V=7, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("B,T", [(3, 5), (4, 4)])  # T == B: shapes cannot tell the layouts apart
def test_transformer_encoder_layer_exact(batch_first, B, T):
    torch.manual_seed(0)
    model = IssueModel(batch_first=batch_first).eval()
    layers = select_layers(model)
    names = [layer.name for layer in layers]
    assert names == ["block.self_attn", "block.self_attn.out_proj", "block.linear1",
                     "block.linear2", "head", "unused"]
    sk = exact_check(model, ids_batch(B, T), token_loss, layers)
    seq = "hooks (sequence-first input)"
    want = {"block.self_attn": seq, "block.self_attn.out_proj": seq,
            "block.linear1": "hooks" if batch_first else seq,
            "block.linear2": "hooks" if batch_first else seq, "head": "hooks", "unused": "hooks"}
    assert {k: v["capture"] for k, v in sk.describe().items()} == want
    assert any("zero gradient" in n for n in sk.describe()["unused"]["notes"])
    assert not any(sk.describe()[n]["notes"] for n in names if n != "unused")
    assert_no_grad(model)


def test_transformer_encoder_stack_seq_first_compressed():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0), 2,
                                enable_nested_tensor=False)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.enc, self.out = nn.Embedding(7, 8), enc, nn.Linear(8, 7)

        def forward(self, ids):
            return self.out(self.enc(self.emb(ids).transpose(0, 1)).transpose(0, 1))

    model = M().eval()
    exact_check(model, ids_batch(5, 5), token_loss, sparse="random_mask-4*4", proj="sjlt-16")
    exact_check(model, ids_batch(3, 6), token_loss)


def test_mha_alone_cross_attention_goes_exact():
    """Self-attention: the packed in-projection is one F.linear (hooked). Cross-attention
    splits the weight into views, which no hook sees: the check moves it to torch.func."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self, cross):
            super().__init__()
            self.mha, self.cross = nn.MultiheadAttention(6, 2, batch_first=True), cross

        def forward(self, x):
            kv = x.flip(1) if self.cross else x
            return self.mha(x, kv, kv, need_weights=False)[0]

    loss = lambda m, x: m(x).pow(2).mean((1, 2))  # noqa: E731
    x = torch.randn(4, 4, 6)
    sk = exact_check(Attn(False).eval(), x, loss)
    assert set(sk.route.values()) == {"seq_first"}
    sk = exact_check(Attn(True).eval(), x, loss)
    assert sk.route == {"mha": "exact", "mha.out_proj": "seq_first"}
    assert "not all seen" in sk.describe()["mha"]["notes"][0]


def test_linear_subclasses_functional_and_tied_weights():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.mu = ActLinear(5, 6), MuLinear(6, 6)
            self.side = nn.Linear(6, 4)          # its forward never runs: parent uses F.linear
            self.enc, self.dec = nn.Linear(4, 3), nn.Linear(4, 3)
            self.dec.weight = self.enc.weight    # tied, biases separate
            self.head = nn.Linear(3, 2)          # never called

        def forward(self, x):
            h = self.mu(self.act(x))
            h = F.relu(F.linear(h, self.side.weight, self.side.bias))
            return self.enc(h) * self.dec(h.flip(0).flip(0) * 2)

    model = M().eval()
    x = torch.randn(6, 5)
    loss = lambda m, b: m(b).pow(2).sum(1)  # noqa: E731
    layers = select_layers(model)
    assert [layer.name for layer in layers] == ["act", "mu", "side", "enc", "head"]
    sk = exact_check(model, x, loss, layers)
    assert sk.route["enc"] == sk.route["side"] == "batch_first"
    assert "different biases" in sk.left_out["dec.bias"]
    exact_check(model, x, loss, select_layers(model, ["enc.weight", "*.bias"]))
    exact_check(model, x[:, None].expand(6, 3, 5).contiguous(), lambda m, b: m(b).pow(2).sum((1, 2)),
                sparse="random_mask-3*2", proj="sjlt-8")


def test_weight_used_outside_f_linear_goes_exact():
    """A weight also used through a matmul: hooks see part of its gradient; never a wrong
    sketch."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight

    model = M().eval()
    sk = exact_check(model, torch.randn(5, 4), lambda m, b: m(b).pow(2).sum(1))
    assert sk.route["fc"] == "exact"


def test_nonseparable_loss_names_the_layer_and_glob():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    sk = GradientSketcher(model, select_layers(model), sparsification="identity",
                          projection="identity")
    centred = lambda m, b: (m(b) - m(b).mean(0)).pow(2).sum(1)  # noqa: E731  in-batch coupling
    with pytest.raises(CaptureError, match=r"layer 0 cannot be captured exactly.*layers='!0\.\*'"):
        sk.sketch(torch.randn(5, 3), centred)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    sk = GradientSketcher(bn, select_layers(bn), sparsification="identity", projection="identity")
    with pytest.raises(CaptureError, match=r"model\.eval\(\)"):
        sk.sketch(torch.randn(5, 3), lambda m, b: m(b).pow(2).sum(1))


def test_exclusion_glob_and_left_out():
    model = IssueModel()
    layers = select_layers(model, ["!unused.*", "!block.self_attn.*"])
    assert [layer.name for layer in layers] == ["block.linear1", "block.linear2", "head"]
    sk = GradientSketcher(model, layers, sparsification="identity", projection="identity")
    assert "emb.weight" in sk.left_out and "not a Linear/Conv" in sk.left_out["emb.weight"]
    assert "unused.weight" in sk.left_out


# ---------------------------------------------------------------- convolutions
class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.same = nn.Conv2d(8, 6, (2, 3), padding="same", padding_mode="reflect")
        self.short = nn.Conv2d(8, 6, 1)
        self.seq = nn.Conv1d(6, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.grouped(h), inplace=True) + h
        h = self.same(h) + self.short(h)
        h = self.seq(h.flatten(2))
        return self.fc(h.mean(-1))


def test_small_resnet_convs_exact():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x, y = torch.randn(4, 3, 9, 8), torch.tensor([0, 1, 2, 1])
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    layers = select_layers(model)
    assert [(layer.name, layer.kind, layer.d_in, layer.d_out, layer.groups) for layer in layers][:3] \
        == [("stem", "conv", 27, 8, 1), ("grouped", "conv", 18, 2, 4), ("same", "conv", 48, 6, 1)]
    sk = exact_check(model, (x, y), loss, layers)
    assert set(sk.route.values()) == {"batch_first"}
    assert sk.layout["grouped"] == 8 * 19
    sk = exact_check(model, (x, y), loss, layers, sparse="random_mask-8*2", proj="sjlt-12")
    assert sk.layout["grouped"] == 4 * 12 and sk.route["grouped"] == "batch_first"
    exact_check(model, (x, y), loss, layers, sparse="random_mask-64*4", proj="sjlt-16")  # kept all
    # every parameter kind through the flat path, and no numpy crash on detached rows
    every = select_layers(model, ["*"])
    got = exact_check(model, (x, y), loss, every)
    assert {layer.kind for layer in every} == {"conv", "linear", "flat"}
    assert got.dim > 0


# ---------------------------------------------------------------- tiny HF models
def _lm_loss(model, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (tok * m).sum(1) / m.sum(1)


def _lm_batch(V, B=3, T=6):
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_tiny_gpt2_t_equals_b():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=17, n_positions=8,
                        attn_implementation="eager")
    model = tr.GPT2LMHeadModel(cfg).eval()
    sk = exact_check(model, _lm_batch(17, 4, 4), _lm_loss)
    assert set(sk.route.values()) == {"batch_first"}


def test_tiny_llama():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=12,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=19,
                         attn_implementation="eager")
    model = tr.LlamaForCausalLM(cfg).eval()
    sk = exact_check(model, _lm_batch(19, 5, 5), _lm_loss, sparse="random_mask-4*4",
                     proj="sjlt-8")
    assert set(sk.route.values()) == {"batch_first"}


def test_tiny_bert_mlm_unused_pooler():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.BertConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=12,
                        num_attention_heads=2, vocab_size=23, max_position_embeddings=8,
                        attn_implementation="eager")
    model = tr.BertForPreTraining(cfg).eval()
    labels = torch.full((3, 6), -100)
    labels[:, 2] = torch.tensor([4, 5, 6])

    def mlm(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).prediction_logits
        tok = F.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="none",
                              ignore_index=-100)
        return tok.sum(1)

    batch = dict(_lm_batch(23), labels=labels)
    sk = exact_check(model, batch, mlm)
    d = sk.describe()
    assert any("zero gradient" in n for n in d["bert.pooler.dense"]["notes"])
    assert any("zero gradient" in n for n in d["cls.seq_relationship"]["notes"])


def test_bf16_gpt2_not_upcast():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=17, n_positions=8,
                        attn_implementation="eager")
    ref = tr.GPT2LMHeadModel(cfg).eval()
    model = tr.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(ref.state_dict())
    model.to(torch.bfloat16)
    layers = select_layers(model)
    sk = GradientSketcher(model, layers, sparsification="identity", projection="identity")
    got = sk.sketch(_lm_batch(17), _lm_loss)
    assert got.dtype == torch.float32 and set(sk.route.values()) == {"batch_first"}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    exact = per_sample_gradients(ref, _lm_batch(17), _lm_loss, select_layers(ref))
    want = torch.cat(list(exact.values()), 1)
    rel = (got - want).norm(dim=1) / want.norm(dim=1)
    assert float(rel.max()) < 0.05


# ---------------------------------------------------------------- end to end
def test_build_index_scores_equal_exact_dot_products(tmp_path):
    import grass_index

    torch.manual_seed(0)
    model = IssueModel().eval()
    data = [ids_batch(1, 6, seed=i)[0] for i in range(10)]
    idx = grass_index.build_index(model, data, token_loss, tmp_path / "ix",
                                  sparsification="identity", projection="identity",
                                  hessian="identity", batch_size=4, progress=False)
    layers = select_layers(model)
    train = torch.stack(data)
    g = torch.cat(list(per_sample_gradients(model, train, token_loss, layers).values()), 1)
    queries = data[:3]
    want = g[:3].double() @ g.double().T
    got = idx.score(model, queries, token_loss).double()
    rel = (got - want).abs().max() / want.abs().max()
    assert float(rel) < 1e-4, float(rel)


def test_default_efim_build_drops_the_unreached_head(tmp_path):
    """The unused head's Fisher is zero: the build records it as dropped instead of failing
    after pass 1, and the capture notes reach the index's description."""
    import grass_index

    torch.manual_seed(0)
    model = IssueModel().eval()
    data = [ids_batch(1, 6, seed=i)[0] for i in range(8)]
    idx = grass_index.build_index(model, data, token_loss, tmp_path / "ix",
                                  sparsification="identity", projection="sjlt-16",
                                  batch_size=4, progress=False)
    assert list(idx.config["preconditioner"]["dropped"]) == ["unused"]
    notes = idx.config["layers_described"]["unused"]["notes"]
    assert any("zero gradient" in n for n in notes)
    assert idx.config["layers_described"]["block.self_attn"]["capture"].startswith("hooks")
    assert idx.score(model, data[:2], token_loss).shape == (2, 8)


def test_routes_recorded_by_a_check_are_reused():
    torch.manual_seed(0)
    model = IssueModel(batch_first=False).eval()
    layers = select_layers(model)
    first = GradientSketcher(model, layers, sparsification="identity", projection="identity")
    first.check(ids_batch(4, 4), token_loss)
    routes = {n: d["capture"] for n, d in first.describe().items()}
    again = GradientSketcher(model, layers, sparsification="identity", projection="identity",
                             routes=routes)
    assert again.checked and again.route == first.route
    torch.testing.assert_close(again.sketch(ids_batch(3, 5), token_loss),
                               first.sketch(ids_batch(3, 5), token_loss))
    # an incomplete record is ignored: the new sketcher checks for itself
    partial = GradientSketcher(model, layers, sparsification="identity", projection="identity",
                               routes={"head": "hooks"})
    assert not partial.checked
