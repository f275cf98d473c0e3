"""Language-model examples: examples/tiny_gpt.py (generated facts corpus) and
examples/hf_causal_lm.py (any HF causal LM from a local directory; tested with tiny random
Llama / GPT-2 configs saved into tmp_path, nothing downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from grass_index.cli.main import app  # noqa: E402
from grass_index.task import load_task  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY_GPT = str(EXAMPLES / "tiny_gpt.py")
HF_LM = str(EXAMPLES / "hf_causal_lm.py")
SMALL = ["--sparsification", "random_mask-16*16", "--projection", "sjlt-256", "--batch-size", "32"]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------ tiny GPT

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GPT task with a quick (5-step) model in a private weight cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRASS_INDEX_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("GRASS_INDEX_TINY_GPT_STEPS", "5")
    mp.delenv("GRASS_INDEX_TINY_GPT_ACT", raising=False)
    try:
        t = load_task(TINY_GPT)
        yield t, t.model()
    finally:
        mp.undo()


def test_tiny_gpt_task_loads(tiny):
    t, m = tiny
    src = t.source
    train, query = t.train_data(), t.query_data()
    n = src.N_FACTS
    assert len(train) == 3 * n and len(query) == n
    assert src.train_facts() == train.facts and src.query_facts() == query.facts
    assert sorted(set(src.train_facts())) == list(range(n))
    # the query sentence of a fact is not in the training data, but its fact is (3 times)
    assert not set(query.texts) & set(train.texts)
    for text, f in zip(query.texts, query.facts):
        name, town = src.facts()[f]
        assert name in text and town in text
        assert sum(tf == f for tf in train.facts) == 3
    assert t.label(train[0]) == train.texts[0]  # label decodes the sentence
    assert t.has("train") and t.has("collate") and t.has("query_data")
    assert type(m).__name__ == "GPT2LMHeadModel" and not m.training
    assert m.config.n_layer == src.N_LAYER and m.config.vocab_size == src.VOCAB


def test_tiny_gpt_weights_are_cached(tiny, monkeypatch):
    t, m = tiny
    path = t.source._cache_path()
    assert path.is_file()
    m2 = t.model()  # loads from the cache: same weights
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    monkeypatch.setenv("GRASS_INDEX_TINY_GPT_ACT", "relu")  # other recipe, other cache file
    assert t.source._cache_path() != path


def test_tiny_gpt_loss_shape_and_padding_mask(tiny):
    t, m = tiny
    train = t.train_data()
    items = [train[i] for i in (0, 1, 5)]
    assert len({len(x) for x in items}) > 1  # the batch really is padded
    ids, mask = batch = t.collate(items)
    with torch.no_grad():
        out = t.loss(m, batch)
        assert out.shape == (3,) and torch.isfinite(out).all() and (out > 0).all()
        # changing what sits in the padded positions does not change any loss
        ids2 = ids.clone()
        g = torch.Generator().manual_seed(0)
        junk = torch.randint(3, t.source.VOCAB, ids.shape, generator=g)
        ids2[mask == 0] = junk[mask == 0]
        torch.testing.assert_close(t.loss(m, (ids2, mask)), out)
        # and each loss equals that sequence's loss alone (no padding at all)
        alone = torch.cat([t.loss(m, t.collate([x])) for x in items])
        torch.testing.assert_close(alone, out, rtol=1e-4, atol=1e-4)
        # it is a sum over tokens, not a mean: per-token CE times number of predicted tokens
        assert float(out[0]) > float(out[0]) / (len(items[0]) - 1)


def test_tiny_gpt_build_query_self_influence(tiny, tmp_path):
    """CLI round trip: a training sentence used as a query has itself (or a sentence of the
    same fact) as top proponent, and `query` prints the proponent texts."""
    t, m = tiny
    out = tmp_path / "idx"
    b = invoke("build", TINY_GPT, "--out", out, *SMALL)
    assert b.exit_code == 0, b.output
    ids = [0, 7, 50, 95]
    q = invoke("query", out, "--task", TINY_GPT, "--split", "train",
               *sum((["--example", i] for i in ids), []),
               "--top-k", 3, "--json")
    assert q.exit_code == 0, q.output
    doc = json.loads(q.stdout)
    train = t.train_data()
    for i, res in zip(ids, doc["results"]):
        assert res["label"] == train.texts[i]
        top = res["proponents"][0]
        assert top["train_id"] == i or train.facts[top["train_id"]] == train.facts[i], res
        assert top["score"] > 0
        assert [p["label"] for p in res["proponents"]] == \
            [train.texts[p["train_id"]] for p in res["proponents"]]
    # the human table shows the texts too
    h = invoke("query", out, "--task", TINY_GPT, "--split", "train", "--example", 7, "--top-k", 2)
    assert h.exit_code == 0 and train.texts[7] in h.output


# ------------------------------------------------------------------------------ HF local path

# lines of different lengths: the index infers from the first, second and last training
# examples which dimensions may vary, and a query must fit that signature
LINES = [f"note {i}: the {a} is {b}." + " really" * (i % 3) for i, (a, b) in enumerate(
    [("sky", "blue"), ("grass", "green"), ("sun", "hot"), ("snow", "cold"), ("sea", "deep"),
     ("road", "long")] * 2)]


def _save_llama_with_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)


def _save_gpt2_no_tokenizer(d: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(d)


@pytest.mark.parametrize("kind", ["llama+tokenizer", "gpt2+bytes"])
def test_hf_causal_lm_local_round_trip(kind, tmp_path, monkeypatch):
    mdir = tmp_path / "model"
    (_save_llama_with_tokenizer if kind.startswith("llama") else _save_gpt2_no_tokenizer)(mdir)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(LINES) + "\n\n")  # blank lines are skipped
    monkeypatch.setenv("GRASS_INDEX_MODEL_PATH", str(mdir))
    monkeypatch.setenv("GRASS_INDEX_TEXT_FILE", str(text))
    monkeypatch.delenv("GRASS_INDEX_QUERY_FILE", raising=False)
    monkeypatch.setenv("GRASS_INDEX_MAX_LENGTH", "48")

    t = load_task(HF_LM)
    tr = t.train_data()
    assert len(tr) == len(LINES)
    assert [t.label(tr[i]).strip() for i in range(3)] == LINES[:3]  # tokenizer round trip
    m = t.model()
    with torch.no_grad():
        ls = t.loss(m, t.collate([tr[0], tr[1], tr[2]]))
    assert ls.shape == (3,) and torch.isfinite(ls).all()

    out = tmp_path / "idx"
    b = invoke("build", HF_LM, "--out", out, "--sparsification", "random_mask-16*16",
               "--projection", "sjlt-128", "--batch-size", 4)
    assert b.exit_code == 0, b.output
    q = invoke("query", out, "--task", HF_LM, "--example", 1, "--example", 4, "--top-k", 3,
               "--json")
    assert q.exit_code == 0, q.output
    doc = json.loads(q.stdout)
    for i, res in zip((1, 4), doc["results"]):  # queries default to the training lines
        assert res["proponents"][0]["train_id"] == i
        assert res["proponents"][0]["label"].strip() == LINES[i]

    # an explicit query file
    qf = tmp_path / "q.txt"
    qf.write_text("note 99: the sky is blue.\n")
    monkeypatch.setenv("GRASS_INDEX_QUERY_FILE", str(qf))
    s = invoke("score", out, "--task", HF_LM, "--out", tmp_path / "s.npy")
    assert s.exit_code == 0, s.output
    assert np.load(tmp_path / "s.npy").shape == (1, len(LINES))


def test_hf_causal_lm_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("GRASS_INDEX_MODEL_PATH", raising=False)
    monkeypatch.delenv("GRASS_INDEX_TEXT_FILE", raising=False)
    r = invoke("build", HF_LM, "--out", tmp_path / "a")
    assert r.exit_code != 0 and "GRASS_INDEX_MODEL_PATH is not set" in r.output
    monkeypatch.setenv("GRASS_INDEX_MODEL_PATH", str(tmp_path / "nope"))
    r = invoke("build", HF_LM, "--out", tmp_path / "a")
    assert r.exit_code != 0 and "is not a directory" in r.output
    mdir = tmp_path / "empty"
    mdir.mkdir()
    monkeypatch.setenv("GRASS_INDEX_MODEL_PATH", str(mdir))
    r = invoke("build", HF_LM, "--out", tmp_path / "a")
    assert r.exit_code != 0 and "no config.json" in r.output

    gdir = tmp_path / "gpt2"
    _save_gpt2_no_tokenizer(gdir)
    monkeypatch.setenv("GRASS_INDEX_MODEL_PATH", str(gdir))
    r = invoke("build", HF_LM, "--out", tmp_path / "a")
    assert r.exit_code != 0 and "GRASS_INDEX_TEXT_FILE is not set" in r.output
    monkeypatch.setenv("GRASS_INDEX_TEXT_FILE", str(tmp_path / "missing.txt"))
    r = invoke("build", HF_LM, "--out", tmp_path / "a")
    assert r.exit_code != 0 and "file not found" in r.output


# ------------------------------------------------------------------------------ slow: quality

@pytest.mark.slow
def test_tiny_gpt_fact_retrieval_and_lds(tmp_path, monkeypatch, capsys):
    """The full recipe (300 steps): queries about a fact retrieve the sentences stating it,
    and LDS on a small subset benchmark (6 subsets x 1 seed) is clearly positive."""
    import grass_index as gi
    from grass_index.eval import run_eval

    monkeypatch.setenv("GRASS_INDEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRASS_INDEX_TINY_GPT_STEPS", raising=False)
    monkeypatch.delenv("GRASS_INDEX_TINY_GPT_ACT", raising=False)
    t = load_task(TINY_GPT)
    m = t.model()
    train, query = t.train_data(), t.query_data()
    idx = gi.build_index(m, train, t.loss, tmp_path / "idx", collate=t.collate, task=t.ref,
                         sparsification="random_mask-32*32", projection="sjlt-1024",
                         progress=False)
    S = idx.score(m, query, t.loss, collate=t.collate).numpy()
    tf, qf = np.array(train.facts), np.array(query.facts)
    top = np.argsort(-S, axis=1)[:, :3]
    p1 = float((tf[top[:, 0]] == qf).mean())
    p3 = float((tf[top] == qf[:, None]).mean())
    res = run_eval(idx, task=t, num_subsets=6, alpha=0.5, seeds=(0,),
                   ground_truth=tmp_path / "gt", progress=False)
    with capsys.disabled():
        print(f"\ntiny GPT: fact precision@1 {p1:.2f}, @3 {p3:.2f} (chance {3 / len(train):.3f}); "
              f"LDS {res.lds:.3f} (6 subsets, seed 0, {res.seconds['ground_truth']:.0f} s)")
    assert p1 >= 0.3
    assert res.lds > 0.1
