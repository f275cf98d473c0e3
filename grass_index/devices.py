"""Checking a device string before any work: one line naming what is wrong and the fix. Used by
the build (pipeline/run.py) and the query side (query/querying.py)."""
from __future__ import annotations

import torch

from .errors import option
from .indexdir.errors import AttributionError


def check_device(device) -> None:
    """A device that this torch can use, or one line naming what is wrong and the fix."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise AttributionError(f"unknown device {device!r}; use cpu, cuda or cuda:N (a torch "
                               "device string)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AttributionError(f"device {device!r}: this torch ({torch.__version__}) sees no "
                                   f"CUDA device; use {option('device', 'cpu')}, or install a "
                                   "CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AttributionError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                                   "device(s) are visible; use cuda:0..")
        return
    try:
        torch.empty(1, device=dev)
    except Exception as e:
        raise AttributionError(f"device {device!r} is not usable here ({type(e).__name__}: "
                               f"{e}); use {option('device', 'cpu')}") from None
