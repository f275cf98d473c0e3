"""Calling the user's functions on data — collate and loss — with errors that blame the task
(TaskError, re-exported by grass_index.task): used by the task loader (task.py), fixed batches
(batching.py), the build (pipeline/) and the query side, none of which need the rest of
task.py (loading task files, which task an index may run)."""
from __future__ import annotations

import torch

from .capture import CaptureError, check_loss_shape
from .errors import GrassIndexError


class TaskError(GrassIndexError, ValueError):
    """A task file/reference is unusable; the message says what is wrong and how to fix it."""


# Raised here, reported as grass_index.task.TaskError (the public name).
TaskError.__module__ = "grass_index.task"


def default_collate(items):
    """torch's default_collate (imported lazily; it lives in torch.utils.data)."""
    from torch.utils.data import default_collate as dc

    return dc(items)


def collate_items(collate, items: list, what: str):
    """``collate(items)``, with the user's data named when it fails (e.g. examples of
    different lengths, which torch's default_collate cannot stack)."""
    try:
        return (collate or default_collate)(items)
    except Exception as e:
        hint = ("; examples of different sizes need a collate(items) function in the task "
                "that pads them" if collate in (None, default_collate) else
                "; fix the task's collate()")
        raise TaskError(f"collating {what} failed ({type(e).__name__}: {e}){hint}") from e


def check_loss(model, data, loss_fn, collate=None, *, n: int = 2, where: str = "loss_fn") -> None:
    """Fail early (before any gradient work) when the loss is reduced or mis-shaped."""
    b = min(n, len(data))
    batch = collate_items(collate, [data[i] for i in range(b)], f"examples 0..{b - 1}")
    try:
        with torch.no_grad():
            out = loss_fn(model, batch)
    except Exception as e:
        raise TaskError(f"{where}: loss(model, batch) raised {type(e).__name__}: {e}") from e
    try:
        check_loss_shape(out, b)
    except CaptureError as e:
        raise TaskError(f"{where}: {e}") from None
