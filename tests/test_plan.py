"""`grass-index plan`: a model's config alone suffices (meta device, no weights), --hessian
changes what is priced, and the predicted disk of a small language-model build is within 25% of
what the build writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

import grass_index as gi  # noqa: E402
from grass_index import plan as plan_mod  # noqa: E402
from grass_index.cli.main import app  # noqa: E402

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _llama_config():
    from transformers import LlamaConfig

    # Llama-3's shape (grouped-query attention, gated MLP, untied head), tiny sizes
    return LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=112,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    _llama_config().save_pretrained(d / "config-only")
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(d / "weights")
    return d / "config-only", d / "weights"


def test_plan_from_a_config_alone_equals_the_plan_from_weights(llama_dirs):
    from transformers import LlamaForCausalLM

    config_only, weights = llama_dirs
    assert [f.name for f in config_only.iterdir()] == ["config.json"]
    specs = dict(sparsification="random_mask-8*8", projection="sjlt-64")
    r = invoke("plan", "--hf-model", config_only, "--n", 5000, "--max-length", 48, "--json",
               *[a for k, v in specs.items() for a in (f"--{k}", v)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["meta_device"]
    got = doc["plans"]["sjlt-64"]
    real = plan_mod.plan_for(LlamaForCausalLM.from_pretrained(weights), 5000, tokens=48,
                             **specs)
    assert got["K"] == real.K == 15 * 64  # 7 Linear per layer × 2 + the head
    assert (got["ram_peak"], got["disk"]) == (real.ram_peak, real.disk)


def test_plan_hessian_and_nodes_change_what_is_priced(llama_dirs):
    config_only, _ = llama_dirs
    args = ["plan", "--hf-model", config_only, "--n", 100_000, "--max-length", 32, "--json",
            "--sparsification", "random_mask-8*8", "--projection", "sjlt-64"]
    docs = {h: json.loads(invoke(*args, "--hessian", h).stdout)["plans"]["sjlt-64"]
            for h in ("identity", "eFIM")}
    assert docs["identity"]["preconditioner"] == 0 and docs["eFIM"]["preconditioner"] > 0
    # (two runs measure their own rates: compare what identity never does)
    fit = {h: d["seconds"]["pass2_stages"]["fit"] for h, d in docs.items()}
    assert fit["identity"] == 0 < fit["eFIM"] and docs["eFIM"]["forms"]["dense"] == 15
    # a fixed device rate (a slow one, so compute outweighs the measured disk rate)
    one, four = (json.loads(invoke(*args, "--device-flops", 1e9, "--nodes", nodes).stdout)
                 ["plans"]["sjlt-64"] for nodes in (1, 4))
    assert four["seconds"]["pass1"] == pytest.approx(one["seconds"]["pass1"] / 4, rel=0.05)
    assert four["per_node"]["store"] == pytest.approx(one["store"] / 4)
    r = invoke("plan", "--hf-model", config_only)
    assert r.exit_code == 1 and "--n N" in r.output and "Traceback" not in r.output


def test_meta_model_has_no_storage(llama_dirs):
    from grass_index.tasks.hf_lm import meta_causal_lm

    m = meta_causal_lm(llama_dirs[0], "bfloat16")
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in m.parameters())
    n, L, d = plan_mod.matmul_params(m)
    assert (L, d) == (2, 32) and n == sum(p.numel() for name, p in m.named_parameters()
                                          if name.endswith("proj.weight")
                                          or name == "lm_head.weight")


WORDS = "the index answers which training examples made the model behave this way".split()


def test_plan_disk_within_a_quarter_of_a_small_build(tmp_path):
    """Disk is deterministic (no noise to allow for): store, preconditioner and index files of
    a 2-layer GPT-2 build over 120 lines against the plan's prediction for the same specs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(0)
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 8))
                                              for _ in range(120)))
    t = gi.hf_lm_task(tmp_path / "m", tmp_path / "c.txt", max_length=16)
    specs = dict(sparsification="random_mask-8*8", projection="sjlt-64")
    out = tmp_path / "idx"
    gi.build_index(t.index_model(), t.train_data(), t.loss, out, batch_size=40,
                   collate=t.collate, progress=False, **specs)
    p = plan_mod.plan_for(t.index_model(), 120, batch_size=40, tokens=16, **specs)
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert 0.75 * written <= p.disk <= 1.25 * written, (p.disk, written)


def test_time_batch_times_pass1_on_the_data(llama_dirs, tmp_path):
    config_only, weights = llama_dirs
    data = tmp_path / "c.txt"
    data.write_text("\n".join(" ".join(WORDS[i:i + 5]) for i in range(6)))
    args = ["plan", "--data", data, "--max-length", 16, "--json", "--time-batch",
            "--sparsification", "random_mask-8*8", "--projection", "sjlt-64", "--batch-size", 4]
    r = invoke(*args[:1], "--hf-model", weights, *args[1:])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    secs = doc["plans"]["sjlt-64"]["seconds"]
    assert not doc["meta_device"] and secs["basis"] == "one timed batch of pass 1"
    assert secs["pass1"] > 0
    r = invoke(*args[:1], "--hf-model", config_only, *args[1:])
    assert r.exit_code == 1 and "needs the weights" in r.output


# --- the forms pass 2 takes, priced as the pipeline takes them ---------------------------------

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))


def _data(n):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 12, generator=g),
                                          torch.randint(0, 6, (n,), generator=g))


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("specs,hessian,n", [
    (dict(sparsification="random_mask-8*8", projection="sjlt-32"), "eFIM", 24),  # n < k
    (dict(sparsification="random_mask-8*8", projection="sjlt-32"), "eFIM", 32),  # n = k
    (dict(sparsification="random_mask-8*8", projection="sjlt-32"), "eFIM", 90),  # n > k
    (dict(sparsification="normal-4*4", projection="identity"), "ekfac", 30),
])
def test_plan_prices_the_forms_the_build_takes_and_its_disk(tmp_path, specs, hessian, n):
    """The form of every layer (low-rank on one side of n = k, dense on the other, EK-FAC) is
    the one the pipeline chose, and the plan's disk is within 25% of the directory's size."""
    out = tmp_path / "idx"
    idx = gi.build_index(_mlp(), _data(n), _loss, out, batch_size=16, progress=False,
                         hessian=hessian, **specs)
    p = plan_mod.plan_for(_mlp(), n, batch_size=16, hessian=hessian, **specs)
    built = idx.config["preconditioner"]["forms"]
    assert {x.name: x.form for x in p.layers} == built
    assert len(set(built.values())) == 1 and next(iter(built.values())) == (
        "ekfac" if hessian == "ekfac" else "low_rank" if n < 32 else "dense")
    assert p.index_width == idx.config["index"]["dim"] == p.K  # exact: it fits
    written = _dir_bytes(out)
    assert 0.75 * written <= p.disk <= 1.25 * written, (p.disk, written)


def test_a_low_rank_plan_prices_no_k_cubed_work():
    """GPT-2 small at n = 64 (every layer low-rank): pass 2's price does not move when the
    Cholesky and eigvalsh rates collapse beyond its n×n solves (the old plan priced a k×k
    inverse per layer); at n = 4,096 (every layer dense) it grows with them, and 'auto'
    damping adds the spectrum of each dense layer only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    fast = plan_mod.Rates()
    slow = plan_mod.Rates(chol=fast.chol / 100, eig=fast.eig / 100)
    small = plan_mod.plan_for(model, 64, batch_size=8, tokens=64)
    big = plan_mod.plan_for(model, 4096, batch_size=8, tokens=64)
    assert (small.dense_layers, small.low_rank_layers, big.dense_layers) == (0, 48, 48)
    assert small.precond_disk == 48 * 64 * 64 * 8 and small.fisher_disk == 0
    assert big.precond_disk == 48 * 4096 ** 2 * 4 and big.fisher_disk == 2 * big.precond_disk
    layout = {x.name: x.k for x in small.layers}

    def p2(plan, rates, damping=None):
        return plan_mod.pass2_seconds(layout, plan.n, "eFIM", rates, plan, damping=damping)
    # (its n×n solves remain: 64³, a 262,144th of a 4096³ factorization)
    assert p2(small, slow) - p2(small, fast) < 1e-3 * 48 * 4096 ** 3 / slow.chol
    assert p2(big, slow) > 20 * p2(big, fast)
    assert p2(small, fast, "auto") == pytest.approx(p2(small, fast, "0.3"), rel=0.01)
    # the spectrum replaces the Lanczos top eigenvalue (60 products with the k×k F)
    k = 4096
    assert p2(big, fast, "auto") - p2(big, fast, "0.3") == pytest.approx(
        48 * (k ** 3 / fast.eig - 60 * 8.0 * k * k / fast.mem))
    # RAM: the n = 64 build holds no k×k matrix anywhere
    assert small.ram_peak < 3.5e9 and big.ram_pass1 > 48 * 4096 ** 2 * 8


def test_gpt2_small_plan_from_its_config_alone(tmp_path):
    """`plan --hf-model` on GPT-2 small's config.json (no weights): every layer dense at
    n = 4,096, each pass-2 stage priced, the rates it measured in the JSON."""
    from transformers import GPT2Config

    GPT2Config().save_pretrained(tmp_path / "gpt2")
    r = invoke("plan", "--hf-model", tmp_path / "gpt2", "--n", 4096, "--max-length", 64,
               "--batch-size", 8, "--json", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    got = doc["plans"]["sjlt-4096"]
    assert doc["meta_device"] and got["forms"] == dict(dense=48, low_rank=0, ekfac=0)
    assert set(got["seconds"]["pass2_stages"]) == {"read", "fit", "apply", "index", "write"}
    assert got["seconds"]["pass2"] == pytest.approx(sum(got["seconds"]["pass2_stages"].values()))
    assert doc["rates"]["chol"] > 0 and doc["rates"]["skinny"] > 0
