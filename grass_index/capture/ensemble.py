"""Checkpoint ensembles (TRAK-style): one index over several models of the same architecture
(independently trained seeds, or steps of one run), scored by the mean over checkpoints.

For C checkpoints with per-checkpoint preconditioners,

    score(z, z_i) = (1/C) Σ_c ĝ_c(z)ᵀ (F_c + λ_c I)⁻¹ ĝ_c(z_i)

is one inner product of concatenated vectors. So an ensemble's sketch of an example is the
concatenation over checkpoints of that checkpoint's per-layer sketches, and each checkpoint's
layers are separate blocks of the block-diagonal preconditioner, named ``c{c}/{layer}``: the
Fisher, the damping (per block), the preconditioner, the store and FAISS need nothing new, and
search stays exact. The 1/C is applied once, to the query sketch (``query/querying.py``).

Every checkpoint is sketched with the same projections (same specs and seed), so each block
equals what a single-model index of that checkpoint stores, bit for bit.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

from .errors import CaptureError

PREFIX = "c{c}/"


class Checkpoints:
    """Several models to attribute with at once (a task's ``checkpoints()``); an ordered,
    read-only sequence of nn.Modules. Anywhere the API takes a model, a list of models or a
    Checkpoints means an ensemble."""

    def __init__(self, models: Sequence[nn.Module], *, where: str = "checkpoints"):
        models = list(models)
        if not models:
            raise CaptureError(f"{where} is empty; give at least one nn.Module")
        for c, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise CaptureError(f"{where}[{c}] is a {type(m).__name__}, expected a "
                                   "torch.nn.Module (every checkpoint is a model)")
        self.models = tuple(models)

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self):
        return iter(self.models)

    def __getitem__(self, c: int) -> nn.Module:
        return self.models[c]

    def eval(self) -> "Checkpoints":
        for m in self.models:
            m.eval()
        return self

    def __repr__(self) -> str:
        return f"Checkpoints({len(self)} × {type(self.models[0]).__name__})"


def as_checkpoints(model) -> list[nn.Module] | None:
    """The checkpoints of an ensemble (a Checkpoints, list or tuple of two or more models), or
    None for one model. A list of one model is that model (an ensemble of one is its index)."""
    if isinstance(model, nn.Module):
        return None
    if isinstance(model, (Checkpoints, list, tuple)):
        models = list(Checkpoints(model, where="the list of models").models)
        return models if len(models) > 1 else None
    raise CaptureError(f"expected a torch.nn.Module or a list of them (checkpoints), got "
                       f"{type(model).__name__}")


def single_model(model) -> nn.Module:
    """``model`` itself, or the only model of a one-element list."""
    if isinstance(model, nn.Module):
        return model
    return list(Checkpoints(model, where="the list of models").models)[0]


def block_name(c: int, layer: str) -> str:
    """The preconditioner block (and layout key) of ``layer`` in checkpoint ``c``."""
    return PREFIX.format(c=c) + layer


def split_block(name: str) -> tuple[int | None, str]:
    """(checkpoint, layer) of a layout key; (None, name) for a single-model index."""
    head, sep, rest = name.partition("/")
    if sep and head.startswith("c") and head[1:].isdigit():
        return int(head[1:]), rest
    return None, name


def different_architecture(c: int, got: list[dict], want: list[dict]) -> str | None:
    """Why checkpoint c's selected layers (``layer_dims`` records) differ from checkpoint 0's,
    in one line; None when they are the same."""
    g = {d["name"]: d for d in got}
    w = {d["name"]: d for d in want}
    if list(g) != list(w):
        extra, missing = sorted(set(g) - set(w)), sorted(set(w) - set(g))
        what = "; ".join(x for x in (f"it has {extra}" if extra else "",
                                     f"it lacks {missing}" if missing else "") if x) \
            or "their order differs"
        return (f"checkpoint {c} has other layers than checkpoint 0 ({what}); every checkpoint "
                "of an ensemble must be the same architecture (seeds or training steps of one "
                "model)")
    for name, d in w.items():
        if g[name] != d:
            show = lambda x: (f"{x['kind']} d_in={x['d_in']} d_out={x['d_out']} "  # noqa: E731
                              f"bias={x['has_bias']} numel={x['numel']}")
            return (f"checkpoint {c}'s layer {name!r} is {show(g[name])} but checkpoint 0's is "
                    f"{show(d)}; every checkpoint of an ensemble must be the same architecture "
                    "(seeds or training steps of one model)")
    return None


class EnsembleSketcher:
    """One GradientSketcher per checkpoint behind the interface pass 1 and the query side use
    (``layout``, ``dim``, ``sketch``, ``check``, ``describe``, ``fingerprint``): a batch's
    sketch is the concatenation over checkpoints, layout keys ``c{c}/{layer}``. Checkpoints
    are sketched one after another, so the per-batch memory is one checkpoint's."""

    def __init__(self, sketchers: list):
        if len(sketchers) < 2:
            raise CaptureError("an ensemble needs at least 2 checkpoints")
        self.members = list(sketchers)
        self.layers = self.members[0].layers
        self.device = self.members[0].device

    def __getattr__(self, name: str):
        """Any other sketcher attribute (per-layer notes, left-out parameters, ...) is
        checkpoint 0's: every checkpoint has the same layers and specs."""
        if name.startswith("__") or name == "members":
            raise AttributeError(name)
        return getattr(self.members[0], name)

    @property
    def checkpoints(self) -> int:
        return len(self.members)

    @property
    def layout(self) -> dict[str, int]:
        return {block_name(c, name): k for c, sk in enumerate(self.members)
                for name, k in sk.layout.items()}

    @property
    def dim(self) -> int:
        return sum(sk.dim for sk in self.members)

    @property
    def checked(self) -> bool:
        return all(sk.checked for sk in self.members)

    def fingerprint(self) -> str:
        """Hash of every checkpoint's projections (all equal when drawn from one spec/seed)."""
        h = hashlib.sha256(f"checkpoints={len(self.members)}".encode())
        for sk in self.members:
            h.update(sk.fingerprint().encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, dict]:
        return {block_name(c, name): d for c, sk in enumerate(self.members)
                for name, d in sk.describe().items()}

    def check(self, batch, loss_fn, *, strict: bool = True) -> None:
        for c, sk in enumerate(self.members):
            try:
                sk.check(batch, loss_fn, strict=strict)
            except CaptureError as e:
                raise CaptureError(f"checkpoint {c}: {e}", example=e.example,
                                   layer=e.layer) from e

    def exclude_glob(self, name: str) -> str:
        """The --layers pattern that removes block ``c{c}/{layer}`` (from every checkpoint:
        they share their layers)."""
        c, layer = split_block(name)
        return self.members[c or 0].exclude_glob(layer)

    def check_report(self) -> list[dict]:
        """Every checkpoint's rows of the capture check, layers named ``c{c}/{layer}``."""
        return [dict(r, layer=block_name(c, r["layer"])) for c, sk in enumerate(self.members)
                for r in sk.check_report()]

    def sketch(self, batch, loss_fn) -> torch.Tensor:
        """[B, C·K] float32: each checkpoint's sketch of the batch, in checkpoint order."""
        return torch.cat([sk.sketch(batch, loss_fn) for sk in self.members], dim=1)
