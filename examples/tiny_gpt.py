"""Language-model task: a tiny GPT-2 (HF transformers, random init) on a generated corpus of facts.

    grass-index build examples/tiny_gpt.py --out runs/tiny_gpt \
        --sparsification random_mask-32*32 --projection sjlt-1024   # layers are only 64-256 wide
    grass-index query runs/tiny_gpt --task examples/tiny_gpt.py --example 0   # proponent TEXTS
    grass-index eval runs/tiny_gpt --task examples/tiny_gpt.py --subsets 8 --seeds 0   # LDS
    python examples/tiny_gpt.py                          # build + print proponents of a few queries

The corpus is made here, no download: N_FACTS made-up people, each living in a made-up town,
stated with four sentence templates ("zelo lives in vuran.", "the home of zelo is vuran.", ...).
Each fact is in the training data with three of the templates; the fourth (rotating, so every
template is seen in training) is that fact's query. Attribution is therefore checkable: the
top proponents of a query about a fact should be the training sentences stating that fact
(`train_facts()` / `query_facts()` give the fact id of every example).

Tokens are characters (PAD=0, BOS=1, EOS=2, then the alphabet). An item is a 1-D LongTensor
[BOS, chars..., EOS] of its own length; `collate` right-pads a batch and returns
(input_ids, attention_mask). The loss is the per-token cross-entropy summed over each
sequence's real tokens (padding masked out), one value per sequence.

The model trains itself the first time (a few seconds to a minute on 2 CPU cores, fixed seed)
and the weights are cached under $GRASS_INDEX_CACHE (default ~/.cache/grass-index), like
examples/digits.py. $GRASS_INDEX_TINY_GPT_ACT picks the MLP activation (GPT2Config
activation_function: gelu_new (default), relu, silu, gelu, ...; benchmarks/sparsity.py uses it)
and $GRASS_INDEX_TINY_GPT_STEPS the number of training steps (default 300); both are part of
the weight-cache key, and must be the same for build, query and eval.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grass_index.tasks.hf_lm import collate_with

SEED = 0
N_FACTS = 32
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_POSITIONS = 64
STEPS = 300
LR = 3e-3
WEIGHT_DECAY = 0.0
ACTIVATION = "gelu_new"  # GPT-2's; override with $GRASS_INDEX_TINY_GPT_ACT


def _activation(activation: str | None = None) -> str:
    return activation or os.environ.get("GRASS_INDEX_TINY_GPT_ACT") or ACTIVATION


def _steps() -> int:
    """Training steps: STEPS, or $GRASS_INDEX_TINY_GPT_STEPS (tests train a quick, worse model)."""
    raw = os.environ.get("GRASS_INDEX_TINY_GPT_STEPS")
    if not raw:
        return STEPS
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"GRASS_INDEX_TINY_GPT_STEPS={raw!r}: give a positive integer")
    return n

TEMPLATES = (
    "{n} lives in {c}.",
    "the home of {n} is {c}.",
    "{n} resides in {c}.",
    "{n} is from {c}.",
)
PAD, BOS, EOS = 0, 1, 2
ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
VOCAB = 3 + len(ALPHABET)
_STOI = {ch: i + 3 for i, ch in enumerate(ALPHABET)}
_ITOS = {i: ch for ch, i in _STOI.items()}


# ----------------------------------------------------------------------------- corpus

def _words(rng: np.random.RandomState, n: int, taken: set) -> list[str]:
    """n distinct pronounceable made-up words (2-3 consonant-vowel syllables)."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out = []
    while len(out) < n:
        w = "".join(cons[rng.randint(len(cons))] + vows[rng.randint(len(vows))]
                    for _ in range(rng.randint(2, 4)))
        if rng.rand() < 0.5:
            w += cons[rng.randint(len(cons))]
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def facts() -> list[tuple[str, str]]:
    """The (person, town) pairs: all names and towns distinct."""
    rng = np.random.RandomState(SEED)
    taken = {"the", "home", "lives", "resides", "is", "from", "in", "of"}
    return list(zip(_words(rng, N_FACTS, taken), _words(rng, N_FACTS, taken)))


def _sentences(which: str) -> list[tuple[str, int]]:
    """(text, fact id): training = 3 templates per fact, query = the remaining one."""
    out = []
    for f, (n, c) in enumerate(facts()):
        held_out = f % len(TEMPLATES)
        for t, tpl in enumerate(TEMPLATES):
            if (t == held_out) == (which == "query"):
                out.append((tpl.format(n=n, c=c), f))
    return out


def encode(text: str) -> torch.Tensor:
    bad = sorted(set(text) - set(ALPHABET))
    if bad:
        raise ValueError(f"tiny_gpt: characters {bad} are not in the alphabet {ALPHABET!r}")
    return torch.tensor([BOS] + [_STOI[ch] for ch in text] + [EOS], dtype=torch.long)


def decode(ids) -> str:
    return "".join(_ITOS.get(int(i), "") for i in ids)


class TextData(torch.utils.data.Dataset):
    """Indexable sentences; item i is the LongTensor [BOS, chars, EOS] of sentence i."""

    def __init__(self, sentences: list[tuple[str, int]]):
        self.texts = [s for s, _ in sentences]
        self.facts = [f for _, f in sentences]
        self._items = [encode(s) for s in self.texts]

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


def train_data() -> TextData:
    return TextData(_sentences("train"))


def query_data() -> TextData:
    return TextData(_sentences("query"))


def train_facts() -> list[int]:
    """Fact id of every training sentence (train id order)."""
    return [f for _, f in _sentences("train")]


def query_facts() -> list[int]:
    return [f for _, f in _sentences("query")]


# right-pad to the longest item: (input_ids [B, T], attention_mask [B, T])
collate = collate_with(PAD)


def sequence_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over each sequence's real target tokens: Tensor[B]."""
    tgt = ids[:, 1:]
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              tgt.reshape(-1), reduction="none").view_as(tgt)
    return (per_tok * mask[:, 1:].to(per_tok.dtype)).sum(dim=1)


def loss(model: nn.Module, batch) -> torch.Tensor:
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    return sequence_loss(logits, ids, mask)


def label(item) -> str:
    """The decoded sentence, shown next to train ids by `grass-index query`."""
    return decode(item)


# ----------------------------------------------------------------------------- model

def make_model(activation: str | None = None) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=N_POSITIONS, n_embd=N_EMBD, n_layer=N_LAYER,
                     n_head=N_HEAD, activation_function=_activation(activation),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                     tie_word_embeddings=False)  # untied: lm_head is a capturable linear layer
    return GPT2LMHeadModel(cfg)


def train_model(items, seed: int = SEED, steps: int | None = None, activation: str | None = None,
                lr: float = LR) -> nn.Module:
    """Full-batch AdamW (one-cycle schedule) for a fixed number of steps; deterministic for a
    seed. Also the LDS retraining recipe, so every subset model trains the same number of steps."""
    steps = steps if steps is not None else _steps()
    with torch.random.fork_rng(devices=[]):  # HF init draws from the global RNG; keep callers' RNG
        torch.manual_seed(seed)
        m = make_model(activation)
    ids, mask = collate(list(items))
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    # one-cycle (10% warm-up, cosine decay); a very short run (tests) keeps lr constant
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
             if steps >= 20 else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0))
    m.train()
    n_tok = mask[:, 1:].sum().clamp(min=1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (loss(m, (ids, mask)).sum() / n_tok).backward()
        opt.step()
        sched.step()
    return m.eval()


def _cache_path(activation: str | None = None) -> Path:
    root = Path(os.environ.get("GRASS_INDEX_CACHE", Path.home() / ".cache" / "grass-index"))
    act = _activation(activation)
    recipe = (f"{SEED}-{N_FACTS}-{N_LAYER}-{N_EMBD}-{N_HEAD}-{N_POSITIONS}-{_steps()}-{LR}-"
              f"{WEIGHT_DECAY}-{act}-{TEMPLATES}")
    key = hashlib.sha1(recipe.encode()).hexdigest()[:10]
    return root / f"tiny_gpt_{act}_{key}.pt"


def model(activation: str | None = None) -> nn.Module:
    """The trained tiny GPT (cached on disk after the first call)."""
    path = _cache_path(activation)
    if path.is_file():
        try:
            m = make_model(activation)
            m.load_state_dict(torch.load(path, weights_only=True))
            return m.eval()
        except Exception:  # corrupt cache: retrain below and overwrite
            pass
    m = train_model(train_data(), activation=activation)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(m.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError:  # read-only home: the model is deterministic, so keep it in memory
        pass
    return m


def train(train_data_subset, seed: int) -> nn.Module:
    """Retrain from scratch on a subset with the same recipe as model() (LDS ground truth).
    Seed SEED on the full data reproduces model()."""
    return train_model([train_data_subset[i] for i in range(len(train_data_subset))], seed=seed)


# ----------------------------------------------------------------------------- demo

def fact_retrieval(idx, m=None, k: int = 3) -> float:
    """Precision@k: the fraction of each query's top-k proponents that state the query's fact
    (3 training sentences state each fact; chance is 3 / len(train_data()))."""
    m = m if m is not None else model()
    q, tf, qf = query_data(), train_facts(), query_facts()
    res = idx.query(m, q, loss, k=k, collate=collate)
    return float(np.mean([tf[j] == qf[r] for r, hits in enumerate(res) for j, _ in hits]))


def _demo(out: str = "runs/tiny_gpt", n_show: int = 3) -> None:
    import grass_index as gi

    m, tr, q = model(), train_data(), query_data()
    with torch.no_grad():
        print(f"mean query loss {loss(m, collate(list(q))).mean():.3f} nats/sequence; "
              f"train {loss(m, collate(list(tr))).mean():.3f}")
    idx = gi.build_index(m, tr, loss, out, collate=collate, task=str(Path(__file__).resolve()),
                         sparsification="random_mask-32*32", projection="sjlt-1024",
                         progress=False)
    res = idx.query(m, [q[i] for i in range(n_show)], loss, k=3, collate=collate)
    for i, hits in enumerate(res):
        print(f"\nquery {i}: {label(q[i])!r}")
        for rank, (j, s) in enumerate(hits, 1):
            print(f"  {rank}. train {j:4d}  {s:+.3g}  {label(tr[j])!r}")
    print(f"\nfact precision of the top proponents over {len(q)} queries: "
          f"@1 {fact_retrieval(idx, m, 1):.0%}, @3 {fact_retrieval(idx, m, 3):.0%} "
          f"(chance {3 / len(tr):.0%})")


if __name__ == "__main__":
    _demo()
