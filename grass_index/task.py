"""Loading a user's task file: the model, the data and the per-example loss.

A task is a plain Python file (``path/to/task.py``), a module (``pkg.mod``) or an
attribute of one (``pkg.mod:obj`` / ``task.py:obj``) exposing::

    model() -> nn.Module            train_data() -> Sequence      loss(model, batch) -> Tensor[B]
    query_data() -> Sequence        (optional)
    collate(items) -> batch         (optional; default torch's default_collate)
    image(item) -> 2-D array        (optional; lets `query --png` draw examples)
    label(item) -> str              (optional; shown next to train ids)
    train(subset, seed) -> nn.Module (optional; retrains from scratch, for LDS evaluation)

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

REQUIRED = ("model", "train_data", "loss")
OPTIONAL = ("query_data", "collate", "image", "label", "train")


class TaskError(ValueError):
    """A task file/reference is unusable; the message says what is wrong and how to fix it."""


def default_task_ref() -> str:
    """The bundled digits example (repo checkout / editable install)."""
    here = Path(__file__).resolve().parent.parent / "examples" / "digits.py"
    return str(here)


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
        m.eval()  # DESIGN: eval mode is set by us
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
    if not isinstance(out, torch.Tensor):
        raise TaskError(f"{where}: loss(model, batch) returned {type(out).__name__}; "
                        f"return a Tensor[B] of per-example losses")
    if out.dim() != 1 or out.shape[0] != b:
        raise TaskError(f"{where}: loss(model, batch) returned shape {tuple(out.shape)} for a batch "
                        f"of {b}; it must return one loss per example, Tensor[{b}] "
                        "(use reduction='none', not a mean/sum)")


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


# -- structure of an example (for clear wrong-shape errors at query time) -----------------

def item_signature(item) -> Any:
    """JSON-able structure of one example: nesting, tensor shapes and dtypes. Integer tensors
    (token ids, indices) have variable length by nature, so their sizes are left open (None);
    their number of dims and dtype still have to match."""
    if isinstance(item, torch.Tensor):
        shape = [None] * item.dim() if not (item.is_floating_point() or item.is_complex()) \
            else list(item.shape)
        return {"tensor": shape, "dtype": str(item.dtype).replace("torch.", "")}
    try:
        import numpy as np

        if isinstance(item, np.ndarray):
            shape = list(item.shape) if item.dtype.kind in "fc" else [None] * item.ndim
            return {"tensor": shape, "dtype": str(item.dtype)}
    except ImportError:  # pragma: no cover
        pass
    if isinstance(item, dict):
        return {"dict": {str(k): item_signature(v) for k, v in item.items()}}
    if isinstance(item, (list, tuple)):
        return {"seq": [item_signature(v) for v in item]}
    if isinstance(item, bool):
        return {"scalar": "bool"}
    if isinstance(item, int):
        return {"scalar": "int"}
    if isinstance(item, float):
        return {"scalar": "float"}
    return {"other": type(item).__name__}


def merge_signatures(a, b):
    """Signature of a set of examples: dims that differ (variable length) become None."""
    if a is None:
        return b
    if set(a) != set(b):
        return {"other": "mixed"}
    if "tensor" in a:
        if len(a["tensor"]) != len(b["tensor"]) or a["dtype"] != b["dtype"]:
            return {"other": "mixed"}
        return {"tensor": [x if x == y else None for x, y in zip(a["tensor"], b["tensor"])],
                "dtype": a["dtype"]}
    if "seq" in a:
        if len(a["seq"]) != len(b["seq"]):
            return {"other": "mixed"}
        return {"seq": [merge_signatures(x, y) for x, y in zip(a["seq"], b["seq"])]}
    if "dict" in a:
        if set(a["dict"]) != set(b["dict"]):
            return {"other": "mixed"}
        return {"dict": {k: merge_signatures(a["dict"][k], b["dict"][k]) for k in a["dict"]}}
    return a if a == b else {"other": "mixed"}


def signature_mismatch(expected, got, path: str = "example") -> str | None:
    """Human description of the first way `got` does not fit `expected`, or None."""
    if expected is None or "other" in expected:
        return None
    if "tensor" in expected:
        if "tensor" not in got:
            return f"{path}: expected a tensor {_fmt(expected)}, got {_fmt(got)}"
        es, gs = expected["tensor"], got["tensor"]
        if len(es) != len(gs) or any(e is not None and e != g for e, g in zip(es, gs)):
            return f"{path}: expected shape {_shape(es)}, got {_shape(gs)}"
        if expected["dtype"] != got["dtype"]:
            return f"{path}: expected dtype {expected['dtype']}, got {got['dtype']}"
        return None
    if "seq" in expected:
        if "seq" not in got or len(got["seq"]) != len(expected["seq"]):
            return (f"{path}: expected a tuple of {len(expected['seq'])} parts like the training "
                    f"examples, got {_fmt(got)}")
        for i, (e, g) in enumerate(zip(expected["seq"], got["seq"])):
            msg = signature_mismatch(e, g, f"{path}[{i}]")
            if msg:
                return msg
        return None
    if "dict" in expected:
        if "dict" not in got or set(got["dict"]) != set(expected["dict"]):
            return f"{path}: expected a dict with keys {sorted(expected['dict'])}, got {_fmt(got)}"
        for k, e in expected["dict"].items():
            msg = signature_mismatch(e, got["dict"][k], f"{path}[{k!r}]")
            if msg:
                return msg
        return None
    if "scalar" in expected and got != expected:
        return f"{path}: expected a {expected['scalar']}, got {_fmt(got)}"
    return None


def _shape(s):
    return "[" + ", ".join("*" if x is None else str(x) for x in s) + "]"


def _fmt(sig) -> str:
    if "tensor" in sig:
        return f"{sig['dtype']}{_shape(sig['tensor'])}"
    if "seq" in sig:
        return "(" + ", ".join(_fmt(s) for s in sig["seq"]) + ")"
    if "dict" in sig:
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in sig["dict"].items()) + "}"
    if "scalar" in sig:
        return sig["scalar"]
    return sig.get("other", "?")
