"""Loading a user's task file: the model, the data and the per-example loss.

A task is a plain Python file (``path/to/task.py``), a module (``pkg.mod``) or an
attribute of one (``pkg.mod:obj`` / ``task.py:obj``) exposing::

    model() -> nn.Module            train_data() -> Sequence      loss(model, batch) -> Tensor[B]
    query_data() -> Sequence        (optional)
    collate(items) -> batch         (optional; default torch's default_collate)
    image(item) -> 2-D array        (optional; lets `query --png` draw examples)
    label(item) -> str              (optional; shown next to train ids)
    train(subset, seed) -> nn.Module (optional; retrains from scratch, for LDS evaluation)
    encode(text) -> item            (optional; turns typed text into an example, e.g. token ids,
                                     so `query --text` can attribute free text)

The reference string is recorded in the index so `query`/`score` need only the directory.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import GrassIndexError
from .signature import item_signature, merge_signatures, signature_mismatch  # noqa: F401

REQUIRED = ("model", "train_data", "loss")
OPTIONAL = ("query_data", "collate", "image", "label", "train", "encode")


class TaskError(GrassIndexError, ValueError):
    """A task file/reference is unusable; the message says what is wrong and how to fix it."""


def default_task_ref() -> str:
    """The bundled digits example, shipped inside the package (grass_index/examples/)."""
    return str(Path(__file__).resolve().parent / "examples" / "digits.py")


def default_collate(items):
    """torch's default_collate (imported lazily; it lives in torch.utils.data)."""
    from torch.utils.data import default_collate as dc

    return dc(items)


@dataclass
class Task:
    """The loaded task: thin wrappers that validate what the user's functions return."""

    ref: str
    source: Any
    _fns: dict = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return self._fns.get(name) is not None

    # -- required -------------------------------------------------------------------
    def model(self) -> torch.nn.Module:
        m = _call(self, "model")
        if not isinstance(m, torch.nn.Module):
            raise TaskError(f"task {self.ref}: model() returned {type(m).__name__}, "
                            "expected a torch.nn.Module")
        m.eval()  # attribution uses the model in eval mode (no dropout); we set it, not the task
        return m

    def train_data(self) -> Sequence:
        return _as_sequence(self, "train_data", _call(self, "train_data"))

    def query_data(self) -> Sequence:
        if not self.has("query_data"):
            raise TaskError(f"task {self.ref} defines no query_data(); add one or pass "
                            "examples with --input FILE")
        return _as_sequence(self, "query_data", _call(self, "query_data"))

    @property
    def loss(self) -> Callable:
        return self._fns["loss"]

    @property
    def collate(self) -> Callable:
        return self._fns.get("collate") or default_collate

    # -- optional -------------------------------------------------------------------
    def image(self, item):
        return self._fns["image"](item) if self.has("image") else None

    def label(self, item) -> str | None:
        return str(self._fns["label"](item)) if self.has("label") else None

    def encode(self, text: str):
        """The example for a piece of text (tasks that define ``encode(text) -> item``)."""
        if not self.has("encode"):
            raise TaskError(f"task {self.ref} defines no encode(text); add one that returns an "
                            "example like train_data()[i] to query by text")
        try:
            return self._fns["encode"](text)
        except Exception as e:  # the user's code rejected the text: name the function
            if isinstance(e, TaskError):
                raise
            raise TaskError(f"task {self.ref}: encode(text) raised {type(e).__name__}: {e}") from e

    @property
    def train(self) -> Callable | None:
        """``train(subset, seed) -> nn.Module`` when the task defines it (LDS needs it)."""
        return self._fns.get("train")

    def check_loss(self, model: torch.nn.Module, data: Sequence, n: int = 2) -> None:
        """Run the loss on the first batch: it must return one finite-shaped loss per example."""
        check_loss(model, data, self.loss, self.collate, n=n, where=f"task {self.ref}")


def _call(task: Task, name: str):
    try:
        return task._fns[name]()
    except TaskError:
        raise
    except Exception as e:  # the user's code failed: name the function
        raise TaskError(f"task {task.ref}: {name}() raised {type(e).__name__}: {e}") from e


def _as_sequence(task: Task, name: str, data) -> Sequence:
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TaskError(f"task {task.ref}: {name}() returned {type(data).__name__}, expected an "
                        "indexable sequence (len() and [i]); wrap iterables with list(...)")
    if len(data) == 0:
        raise TaskError(f"task {task.ref}: {name}() returned an empty sequence")
    return data


def check_loss(model, data, loss_fn, collate=None, *, n: int = 2, where: str = "loss_fn") -> None:
    """Fail early (before any gradient work) when the loss is reduced or mis-shaped."""
    collate = collate or default_collate
    b = min(n, len(data))
    batch = collate([data[i] for i in range(b)])
    try:
        with torch.no_grad():
            out = loss_fn(model, batch)
    except Exception as e:
        raise TaskError(f"{where}: loss(model, batch) raised {type(e).__name__}: {e}") from e
    from .capture import CaptureError, check_loss_shape

    try:
        check_loss_shape(out, b)
    except CaptureError as e:
        raise TaskError(f"{where}: {e}") from None


def load_task(ref: str | os.PathLike | None = None) -> Task:
    """Load a task from a file path, ``module``, or ``module:attr`` (None: bundled digits)."""
    ref = str(ref) if ref is not None else default_task_ref()
    if ref.startswith("hf-lm:"):  # recorded by `build --hf-model` (grass_index/tasks/hf_lm.py)
        from .tasks.hf_lm import task_from_ref
        return task_from_ref(ref)
    source, canonical = _resolve(ref)
    fns = {}
    for name in REQUIRED + OPTIONAL:
        fn = getattr(source, name, None)
        if fn is not None and not callable(fn):
            raise TaskError(f"task {canonical}: {name} must be a function, got {type(fn).__name__}")
        fns[name] = fn
    missing = [n for n in REQUIRED if fns[n] is None]
    if missing:
        raise TaskError(f"task {canonical} is missing {', '.join(f'{m}()' for m in missing)}; "
                        "a task file must define model(), train_data() and loss(model, batch)")
    return Task(ref=canonical, source=source, _fns=fns)


def _resolve(ref: str):
    """Return (object exposing the functions, canonical reference to record)."""
    path_part, attr = ref, None
    # "file.py:attr" or "pkg.mod:attr"; a Windows drive "C:\\" is not an attr separator.
    if ":" in ref and not (len(ref) > 1 and ref[1] == ":" and ref.count(":") == 1):
        path_part, attr = ref.rsplit(":", 1)
    looks_like_path = path_part.endswith(".py") or os.sep in path_part or "/" in path_part
    if looks_like_path:
        p = Path(path_part).expanduser()
        if not p.is_file():
            raise TaskError(f"task file {path_part} not found; pass a .py file, a module name "
                            "or module:attr (omit TASK to use the bundled digits example)")
        p = p.resolve()
        mod = _load_file(p)
        canonical = str(p) + (f":{attr}" if attr else "")
    else:
        try:
            mod = importlib.import_module(path_part)
        except ModuleNotFoundError as e:
            raise TaskError(f"task module {path_part!r} not found ({e}); pass a path to a .py "
                            "file or an importable module name") from e
        except Exception as e:
            raise TaskError(f"task module {path_part!r} failed to import: "
                            f"{type(e).__name__}: {e}") from e
        canonical = ref
    if attr:
        if not hasattr(mod, attr):
            raise TaskError(f"task {ref}: {path_part} has no attribute {attr!r}")
        return getattr(mod, attr), canonical
    return mod, canonical


def _load_file(p: Path):
    name = "grass_index_task_" + hashlib.sha1(str(p).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {p} cannot be imported as Python")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    # Let the task import helper modules that sit next to it.
    if str(p.parent) not in sys.path:
        sys.path.insert(0, str(p.parent))
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        del sys.modules[name]
        raise TaskError(f"task file {p} failed to load: {type(e).__name__}: {e}") from e
    return mod
