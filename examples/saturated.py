"""A saturated classifier: a small MLP trained to convergence on a tabular task (no download).

scikit-learn's bundled breast-cancer table (569 rows, 30 features, 2 classes), standardised and
split 80/20 by a fixed permutation; an MLP 30→32→2 trained full-batch with Adam and no weight
decay until most training examples sit at (numerically) zero loss. Their gradients vanish, so
the empirical Fisher is dominated by the few examples the model still gets wrong or barely
right — the case where eFIM at a small damping amplifies a handful of directions and the best
damping sits near identity (docs/damping.md).

    grass-index build examples/saturated.py --out runs/saturated
    grass-index tune runs/saturated --task examples/saturated.py --subsets 30 --seeds 0

``train(subset, seed)`` retrains from scratch with the same recipe (for LDS).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED, HIDDEN, EPOCHS, LR = 0, 32, 600, 1e-2
TRAIN_FRACTION = 0.8


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = d.data.astype(np.float64)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    perm = np.random.RandomState(SEED).permutation(len(x))
    return x[perm], d.target.astype(np.int64)[perm]


def _split(which: str):
    x, y = _arrays()
    n = int(TRAIN_FRACTION * len(x))
    sl = slice(0, n) if which == "train" else slice(n, None)
    return torch.from_numpy(x[sl]), torch.from_numpy(y[sl])


def _train(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """Full-batch Adam, deterministic for a seed; no weight decay, so it saturates."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))
    opt = torch.optim.Adam(m.parameters(), lr=LR)
    for _ in range(EPOCHS):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


_MODEL: dict = {}


def model() -> nn.Module:
    if "m" not in _MODEL:  # deterministic and well under a second: no weight cache needed
        _MODEL["m"] = _train(*_split("train"), seed=SEED)
    m = nn.Sequential(nn.Linear(30, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))
    m.load_state_dict(_MODEL["m"].state_dict())
    return m.eval()


def train_data():
    return torch.utils.data.TensorDataset(*_split("train"))


def query_data():
    return torch.utils.data.TensorDataset(*_split("test"))


# Below this an example's loss (and gradient) is taken as exactly zero: float32 softmax
# leaves residuals of 1e-38 and less (denormals) on examples fitted with margins near 90,
# whose preconditioned sketches would underflow; they have no influence either way.
ZERO_LOSS = 1e-20


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    ce = F.cross_entropy(model(x), y, reduction="none")
    return torch.where(ce > ZERO_LOSS, ce, torch.zeros_like(ce))


def train(subset, seed: int) -> nn.Module:
    items = [subset[i] for i in range(len(subset))]
    return _train(torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
                  seed)
