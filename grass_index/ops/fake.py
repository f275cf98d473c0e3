"""Fake (meta) kernels: output shapes only, so graphs trace under torch.compile."""
import torch

from . import checks


@torch.library.register_fake("grass_index::sjlt")
def _sjlt_fake(x, idx, sign, k):
    checks.check_sjlt_meta(x, idx, sign, k)
    return x.new_empty(*x.shape[:-1], k)


@torch.library.register_fake("grass_index::mask")
def _mask_fake(x, idx):
    checks.check_mask_meta(x, idx)
    return x.new_empty(*x.shape[:-1], idx.shape[0])
