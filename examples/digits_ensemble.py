"""The digits task as a checkpoint ensemble (TRAK-style): five MLPs trained from init seeds
0..4 with the digits recipe; the index sketches each and scores by the mean over them.

    grass-index build examples/digits_ensemble.py --out runs/digits-ens
    grass-index query runs/digits-ens --task examples/digits_ensemble.py --example 0

Training the five models takes a few seconds; they are cached like digits' model().
"""
from __future__ import annotations

import os

import torch

from grass_index.examples.digits import (  # noqa: F401  (the rest of the task, as is)
    _cache_path, image, label, loss, query_data, split, train, train_data, train_model)

SEEDS = (0, 1, 2, 3, 4)


def _trained(seed: int) -> torch.nn.Module:
    """Seed ``seed`` of the digits recipe, cached beside digits' own model."""
    path = _cache_path().with_name(f"{_cache_path().stem}_seed{seed}.pt")
    if path.is_file():
        try:
            m = train_model(*split("train"), seed=seed, epochs=0)
            m.load_state_dict(torch.load(path, weights_only=True))
            return m.eval()
        except Exception:  # a corrupt cache: retrain below
            pass
    m = train_model(*split("train"), seed=seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(m.state_dict(), tmp)
        os.replace(tmp, path)
    except OSError:  # read-only cache: the models are deterministic, keep them in memory
        pass
    return m


def checkpoints() -> list[torch.nn.Module]:
    return [_trained(s) for s in SEEDS]
