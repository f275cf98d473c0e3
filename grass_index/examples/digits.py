"""Default grass-index task: a small MLP on scikit-learn's bundled 8x8 digits (no download).

    grass-index build              # uses this file (grass_index/examples/digits.py)
    grass-index query runs/digits --task grass_index.examples.digits --example 0 --png q0.png

The model trains itself in about a second the first time (fixed seed) and the weights are
cached under $GRASS_INDEX_CACHE (default ~/.cache/grass-index), so every process that loads
the task sees the same model.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
HIDDEN = 64
EPOCHS = 300
LR = 1e-2
WEIGHT_DECAY = 1e-4
N_TRAIN = 1437  # 80% of the 1797 digits; the rest is the query (test) split


def _arrays():
    """Digits scaled to [0, 1], split by a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(SEED).permutation(len(x))
    return x[perm], y[perm]


def split(which: str):
    x, y = _arrays()
    sl = slice(0, N_TRAIN) if which == "train" else slice(N_TRAIN, None)
    return torch.from_numpy(x[sl]), torch.from_numpy(y[sl])


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def train_model(x: torch.Tensor, y: torch.Tensor, seed: int = SEED, epochs: int = EPOCHS) -> nn.Module:
    """Full-batch Adam, deterministic for a given seed (also used for LDS retraining)."""
    g = torch.Generator().manual_seed(seed)
    m = make_model()
    with torch.no_grad():  # seeded init independent of the global RNG
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[1]) ** 0.5)
            else:
                p.zero_()
    opt = torch.optim.Adam(m.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def _cache_path() -> Path:
    root = Path(os.environ.get("GRASS_INDEX_CACHE", Path.home() / ".cache" / "grass-index"))
    key = hashlib.sha1(f"{SEED}-{HIDDEN}-{EPOCHS}-{LR}-{WEIGHT_DECAY}-{N_TRAIN}".encode()).hexdigest()[:10]
    return root / f"digits_mlp_{key}.pt"


def model() -> nn.Module:
    path = _cache_path()
    m = make_model()
    if path.is_file():
        try:
            m.load_state_dict(torch.load(path, weights_only=True))
            return m.eval()
        except Exception:  # corrupt cache: retrain below and overwrite
            pass
    m = train_model(*split("train"))
    try:
        from grass_index.fileio import atomic_save

        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a concurrent reader never sees half a file
        atomic_save(path, lambda f: torch.save(m.state_dict(), f))
    except OSError:  # read-only home: the model is deterministic, so just keep it in memory
        pass
    return m


def train_data():
    return torch.utils.data.TensorDataset(*split("train"))


def query_data():
    return torch.utils.data.TensorDataset(*split("test"))


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def image(item):
    return item[0].reshape(8, 8).numpy()


def label(item) -> str:
    return f"digit {int(item[1])}"


def train(train_data_subset, seed: int) -> nn.Module:
    """Retrain from scratch on a subset with the same recipe as model() (for LDS evaluation)."""
    items = [train_data_subset[i] for i in range(len(train_data_subset))]
    x = torch.stack([it[0] for it in items])
    y = torch.stack([it[1] for it in items])
    return train_model(x, y, seed=seed)
