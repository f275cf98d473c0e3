"""Fixed batches of examples: pass 1 cuts the training set into blocks [b*B, (b+1)*B) (the
store's block layout, so a resumed build sees exactly the same batches), and queries are
sketched in batches the same way. Shared by the build (pipeline/) and the query side
(query/)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .calls import collate_items


def batch_count(n: int, batch_size: int) -> int:
    """Pass 1's number of batches (= store blocks) of n examples: fixed boundaries
    [b*B, (b+1)*B), the last one possibly short. The one home of this formula."""
    return math.ceil(n / batch_size)


def batches(data: Sequence, batch_size: int, collate, start_block: int = 0,
            what: str = "examples"):
    """Fixed block boundaries [b*B, (b+1)*B): a resumed build sees exactly the same batches."""
    n = len(data)
    for b in range(start_block, batch_count(n, batch_size)):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        yield b, lo, collate_items(collate, [data[i] for i in range(lo, hi)],
                                   f"{what} {lo}..{hi - 1}")


def batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_len(next(iter(batch.values())))
    return 1
