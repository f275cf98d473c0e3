"""Pass 1's batches through a DataLoader with worker processes (pipeline/sketching.py): the
same fixed batches, hence the same sketches bit for bit, for any worker count; a resumed
build continues at the next block; a batch that fails to collate in a worker is one error
line naming its examples."""
import numpy as np
import pytest
import torch

import grass_index as gi
from grass_index.pipeline.sketching import BlockBatches, block_batches
from grass_index.store import SketchStore
from grass_index.task import TaskError

from test_pipeline import PROJ, SPARS, loss_fn, make_data, make_model


def _rows(out):
    with SketchStore.open(out / "sketches") as st:
        return st.get_rows(np.arange(st.num_rows))


def test_workers_give_the_same_sketches_bit_for_bit(tmp_path):
    data = make_data(53, 0)  # 7 batches of 8, the last one short
    rows = {}
    for w in (0, 2):
        gi.build_index(make_model(), data, loss_fn, tmp_path / f"w{w}", sparsification=SPARS,
                       projection=PROJ, batch_size=8, progress=False, workers=w)
        rows[w] = _rows(tmp_path / f"w{w}")
    assert rows[0].shape[0] == 53 and np.array_equal(rows[0], rows[2])


def test_loader_keeps_the_fixed_order_from_any_start():
    data = [torch.tensor([i]) for i in range(28)]
    blocks = [1, 3, 5]  # a worker's shard: global batches 1, 3, 5 of 5 examples
    for workers in (0, 2):  # resumed at local block 1: global batches 3 and 5 (the short one)
        got = [(j, lo, hi, batch[:, 0].tolist()) for j, lo, hi, _, batch in
               block_batches(data, blocks, 5, None, start=1, workers=workers)]
        assert got == [(1, 15, 20, [15, 16, 17, 18, 19]), (2, 25, 28, [25, 26, 27])]


def test_a_batch_that_fails_in_a_worker_is_one_line(tmp_path):
    data = make_data(40, 0)

    def collate(items):
        if torch.equal(items[0][0], data[24][0]):  # the batch of examples 24..31
            raise ValueError("bad example")
        return torch.utils.data.default_collate(items)

    with pytest.raises(TaskError) as e:
        gi.build_index(make_model(), data, loss_fn, tmp_path / "x", sparsification=SPARS,
                       projection=PROJ, batch_size=8, progress=False, workers=2,
                       collate=collate)
    assert "training examples 24..31" in str(e.value) and "Traceback" not in str(e.value)
    assert len(BlockBatches(data, range(5), 8, collate)) == 5
