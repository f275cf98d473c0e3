"""Digits with 10% of the training labels flipped (seeded): a data-cleaning task.

The same MLP and recipe as examples/digits.py, trained on the noisy labels. The query split
keeps its true labels. ``flipped()`` returns the train ids whose label was changed, so a
benchmark can check how many of them a ranking (self-influence, training loss) finds:

    python benchmarks/self_influence.py
    grass-index build examples/digits_noisy.py --out runs/noisy
    grass-index self-influence runs/noisy --top-k 20

It also defines train(subset, seed), so `grass-index eval` and `grass-index tune` work on it
(a second task whose best preconditioning differs from clean digits').
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

NOISE = 0.10
NOISE_SEED = 0


def _digits():
    """examples/digits.py, loaded by path so this file works from any working directory."""
    spec = importlib.util.spec_from_file_location("grass_index_example_digits",
                                                  Path(__file__).with_name("digits.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


D = _digits()


def flipped() -> np.ndarray:
    """Sorted train ids whose label was replaced by a different, uniformly drawn class."""
    return _noisy()[1]


def _noisy():
    x, y = D.split("train")
    rng = np.random.default_rng(NOISE_SEED)
    ids = np.sort(rng.choice(len(y), size=int(round(NOISE * len(y))), replace=False))
    y = y.clone()
    shift = torch.from_numpy(rng.integers(1, 10, size=len(ids)))
    y[ids] = (y[ids] + shift) % 10  # never the true class
    return (x, y), ids


def _cache_path() -> Path:
    root = Path(os.environ.get("GRASS_INDEX_CACHE", Path.home() / ".cache" / "grass-index"))
    key = hashlib.sha1(f"{D.SEED}-{D.HIDDEN}-{D.EPOCHS}-{D.LR}-{D.WEIGHT_DECAY}-{D.N_TRAIN}-"
                       f"{NOISE}-{NOISE_SEED}".encode()).hexdigest()[:10]
    return root / f"digits_noisy_mlp_{key}.pt"


def model() -> torch.nn.Module:
    path = _cache_path()
    m = D.make_model()
    if path.is_file():
        try:
            m.load_state_dict(torch.load(path, weights_only=True))
            return m.eval()
        except Exception:  # corrupt cache: retrain below
            pass
    m = D.train_model(*_noisy()[0])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(m.state_dict(), tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return m


def train_data():
    return torch.utils.data.TensorDataset(*_noisy()[0])


def query_data():
    return D.query_data()


loss = D.loss
image = D.image
label = D.label
train = D.train
