"""A second tune/EK-FAC task, unlike digits: token tagging on generated sequences (no download).

Each example is T=8 tokens of 12 features; a token's tag (one of 4) is set by a hidden linear
rule of its own features and its left neighbour's, with 10% of the training tags flipped at
random. The model is a token-wise MLP over [x_t, x_{t-1}] (Linear 24→32, tanh, Linear 32→4),
and an example's loss is the sum over its tokens — so every layer's per-example gradient is a
sum of T outer products, the case Kronecker-factored preconditioners (EK-FAC) are built for.

    grass-index build examples/token_tagging.py --out runs/tagging \
        --sparsification identity-64*64 --projection identity      # exact, Kronecker factors kept
    grass-index tune runs/tagging --task examples/token_tagging.py --subsets 30 --seeds 0

``train(subset, seed)`` retrains from scratch (full-batch Adam, deterministic) for LDS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SEED, T, D, TAGS, HIDDEN = 0, 8, 12, 4, 32
N_TRAIN, N_QUERY, FLIP = 600, 200, 0.1
EPOCHS, LR, WEIGHT_DECAY = 200, 1e-2, 1e-3


def _make(n: int, seed: int, flip: float):
    g = torch.Generator().manual_seed(1000 + SEED)
    rule = torch.randn(2 * D, TAGS, generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, D, generator=g)
    y = (_pairs(x) @ rule + 0.5 * torch.randn(n, T, TAGS, generator=g)).argmax(-1)
    flipped = torch.rand(n, T, generator=g) < flip
    y = torch.where(flipped, torch.randint(0, TAGS, (n, T), generator=g), y)
    return x, y


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """[x_t, x_{t-1}] per token (zeros before the first)."""
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    return torch.cat([x, prev], -1)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2 * D, HIDDEN), nn.Linear(HIDDEN, TAGS)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(_pairs(x))))


def _train(x, y, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = Tagger()
    opt = torch.optim.Adam(m.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(EPOCHS):
        opt.zero_grad()
        F.cross_entropy(m(x).reshape(-1, TAGS), y.reshape(-1)).backward()
        opt.step()
    return m.eval()


_MODEL: dict = {}


def model() -> nn.Module:
    if "m" not in _MODEL:  # deterministic and ~1 s: no weight cache needed
        _MODEL["m"] = _train(*_make(N_TRAIN, 1, FLIP), seed=SEED)
    m = Tagger()
    m.load_state_dict(_MODEL["m"].state_dict())
    return m.eval()


def train_data():
    return torch.utils.data.TensorDataset(*_make(N_TRAIN, 1, FLIP))


def query_data():
    return torch.utils.data.TensorDataset(*_make(N_QUERY, 2, 0.0))


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, TAGS), y.reshape(-1),
                           reduction="none").reshape(len(x), -1).sum(1)


def train(subset, seed: int) -> nn.Module:
    items = [subset[i] for i in range(len(subset))]
    return _train(torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
                  seed)
