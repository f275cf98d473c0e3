"""The tiny task file (6 -> 5 -> 3 MLP on random data) that CLI and distributed-build tests
write and run, with the knobs those tests turn: train size, a poisoned value, the loss
reduction, a missing function."""
from __future__ import annotations

import textwrap
from pathlib import Path

TASK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g)
        {poison}
        return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=g))

    def train_data():
        return _data({n_train}, 1)

    def query_data():
        return _data(6, 2)

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction={reduction!r})

    def image(item):
        return item[0].reshape(2, 3).numpy()
""")


def write_task(directory: Path, name: str = "task.py", *, n_train: int = 40, poison: str = "",
               reduction: str = "none", drop: str | None = None) -> Path:
    """Write the task into ``directory/name``; ``drop`` renames that function away."""
    src = TASK.format(poison=poison, reduction=reduction, n_train=n_train)
    if drop:
        src = src.replace(f"def {drop}(", f"def _{drop}(")
    p = Path(directory) / name
    p.write_text(src)
    return p
