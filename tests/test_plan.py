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
    assert docs["identity"]["seconds"]["pass2"] < docs["eFIM"]["seconds"]["pass2"]
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
