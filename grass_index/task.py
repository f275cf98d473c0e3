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
                                     so `serve` and `query --text` can attribute text)
    checkpoints() -> [nn.Module]    (optional; several models of one architecture, e.g. seeds or
                                     training steps: the index sketches each and scores by the
                                     mean over them; takes precedence over model() for indexing)

The reference string and, for a file, its sha256 are recorded in the index. An index
directory is data: opening one never imports the recorded task by itself; the user names the
task to run (``--task FILE``), and :func:`task_for_index` compares it with the record.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .calls import TaskError, check_loss, collate_items, default_collate  # noqa: F401
from .capture import CaptureError, Checkpoints
from .signature import item_signature, merge_signatures, signature_mismatch  # noqa: F401
from .errors import spelled
from .untrusted import safe_text

REQUIRED = ("model", "train_data", "loss")
OPTIONAL = ("query_data", "collate", "image", "label", "train", "encode", "checkpoints")


def default_task_ref() -> str:
    """The bundled digits example, shipped inside the package (grass_index/examples/)."""
    return str(Path(__file__).resolve().parent / "examples" / "digits.py")


@dataclass
class Task:
    """The loaded task: thin wrappers that validate what the user's functions return."""

    ref: str
    source: Any
    _fns: dict = field(default_factory=dict)
    sha256: str | None = None  # of the file's bytes that were executed (file tasks only)

    def has(self, name: str) -> bool:
        return self._fns.get(name) is not None

    # -- required -------------------------------------------------------------------
    def model(self) -> torch.nn.Module:
        """The model (a task that defines only checkpoints(): its first checkpoint)."""
        if not self.has("model"):
            return self.checkpoints()[0]
        m = _call(self, "model")
        if not isinstance(m, torch.nn.Module):
            raise TaskError(f"task {self.ref}: model() returned {type(m).__name__}, "
                            "expected a torch.nn.Module")
        m.eval()  # attribution uses the model in eval mode (no dropout); we set it, not the task
        return m

    def checkpoints(self) -> list[torch.nn.Module]:
        """The task's checkpoints (eval mode), or ``[model()]`` when it defines none."""
        if not self.has("checkpoints"):
            return [self.model()]
        got = _call(self, "checkpoints")
        if isinstance(got, torch.nn.Module) or not isinstance(got, (list, tuple)):
            raise TaskError(f"task {self.ref}: checkpoints() returned {type(got).__name__}, "
                            "expected a list of torch.nn.Module (one per checkpoint)")
        try:  # the one check of what a checkpoint list holds (non-empty, every item a model)
            return list(Checkpoints(got, where=f"task {self.ref}: checkpoints()").eval())
        except CaptureError as e:
            raise TaskError(str(e)) from None

    def index_model(self):
        """What an index is built and queried with: the model, or, when the task defines
        checkpoints() with more than one, a Checkpoints ensemble of them (build order)."""
        models = self.checkpoints()
        if len(models) == 1:
            return models[0]
        return Checkpoints(models)

    def train_data(self) -> Sequence:
        return _as_sequence(self, "train_data", _call(self, "train_data"))

    def query_data(self) -> Sequence:
        if not self.has("query_data"):
            raise TaskError(f"task {self.ref} defines no query_data(); add one or pass "
                            + spelled("examples with --input FILE",
                                      "the examples yourself (e.g. load_examples(FILE))"))
        return _as_sequence(self, "query_data", _call(self, "query_data"))

    @property
    def loss(self) -> Callable:
        return self._fns["loss"]

    @property
    def collate(self) -> Callable:
        return self._fns.get("collate") or default_collate

    # -- optional -------------------------------------------------------------------
    def image(self, item):
        return _call_on(self, "image", item) if self.has("image") else None

    def label(self, item) -> str | None:
        return str(_call_on(self, "label", item)) if self.has("label") else None

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


def _call_on(task: Task, name: str, item):
    try:
        return task._fns[name](item)
    except TaskError:
        raise
    except Exception as e:  # the user's code failed on one example: name the function
        raise TaskError(f"task {task.ref}: {name}(item) raised {type(e).__name__}: {e}; fix "
                        f"{name}() in the task file") from e


def _as_sequence(task: Task, name: str, data) -> Sequence:
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TaskError(f"task {task.ref}: {name}() returned {type(data).__name__}, expected an "
                        "indexable sequence (len() and [i]); wrap iterables with list(...)")
    if len(data) == 0:
        raise TaskError(f"task {task.ref}: {name}() returned an empty sequence")
    return data


# Task references built in code rather than loaded from a file: ``prefix -> module:function``
# (the function builds the Task from the whole reference). Resolved by name, like any task
# module, so this module does not import the tasks built on top of it (grass_index/tasks/).
BUILTIN_REF_BUILDERS = {"hf-lm:": "grass_index.tasks.hf_lm:task_from_ref"}  # `build --hf-model`


def _builder_fn(ref: str, name: str):
    """Function ``name`` of the module that builds tasks of ``ref``'s prefix (by name: see
    BUILTIN_REF_BUILDERS); that module also defines ``ref_sha256(ref)`` (what an index
    records of the data the reference names), ``task_for_recorded(given, recorded,
    sha256)`` (the task for an index that recorded one, from what the user named) and
    ``task_flags(ref)`` (the command-line flags that name it again)."""
    for prefix, builder in BUILTIN_REF_BUILDERS.items():
        if ref.startswith(prefix):
            return getattr(importlib.import_module(builder.split(":")[0]), name)
    raise KeyError(ref)


def task_flags(task) -> str | None:
    """How a command line names ``task`` (a reference or a loaded Task) again, for a command
    an error tells the user to run: ``--task REF`` (shell-quoted), or a built-in task's own
    flags (``--hf-model DIR --data FILE ...``: its builder's ``task_flags(ref)``); in Python
    ``task=REF``. None for no task."""
    ref = task.ref if isinstance(task, Task) else task
    if not isinstance(ref, str) or not ref:
        return None
    if _is_hf(ref):
        return _builder_fn(ref, "task_flags")(ref)
    return spelled(f"--task {shlex.quote(ref)}", f"task={ref!r}")


def load_task(ref: str | os.PathLike | None = None) -> Task:
    """Load a task from a file path, ``module``, or ``module:attr`` (None: bundled digits)."""
    ref = str(ref) if ref is not None else default_task_ref()
    for prefix, builder in BUILTIN_REF_BUILDERS.items():
        if ref.startswith(prefix):  # a task built in code, named by the module that builds it
            module, name = builder.split(":")
            return getattr(importlib.import_module(module), name)(ref)
    source, canonical = _resolve(ref)
    fns = {}
    for name in REQUIRED + OPTIONAL:
        fn = getattr(source, name, None)
        if fn is not None and not callable(fn):
            raise TaskError(f"task {canonical}: {name} must be a function, got {type(fn).__name__}")
        fns[name] = fn
    missing = [n for n in REQUIRED if fns[n] is None
               and not (n == "model" and fns["checkpoints"] is not None)]
    if missing:
        raise TaskError(f"task {canonical} is missing {', '.join(f'{m}()' for m in missing)}; "
                        "a task file must define model() (or checkpoints()), train_data() and "
                        "loss(model, batch)")
    return Task(ref=canonical, source=source, _fns=fns, sha256=_LOADED.get(_file_part(canonical)))


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


_LOADED: dict[str, str] = {}  # resolved task file path -> sha256 of the bytes executed


def _load_file(p: Path):
    """Import a task file by executing exactly the bytes whose sha256 is recorded (read once,
    so the file cannot change between hashing and running)."""
    name = "grass_index_task_" + hashlib.sha1(str(p).encode()).hexdigest()[:12]
    if name in sys.modules and str(p) in _LOADED:
        return sys.modules[name]
    try:
        src = p.read_bytes()
    except OSError as e:
        raise TaskError(f"task file {p} is unreadable: {e}") from e
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None:
        raise TaskError(f"task file {p} cannot be imported as Python")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    # Let the task import helper modules that sit next to it.
    if str(p.parent) not in sys.path:
        sys.path.insert(0, str(p.parent))
    try:
        exec(compile(src, str(p), "exec"), mod.__dict__)
    except Exception as e:
        del sys.modules[name]
        raise TaskError(f"task file {p} failed to load: {type(e).__name__}: {e}") from e
    _LOADED[str(p)] = file_sha256(src)
    return mod


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_part(ref: str) -> str:
    """The file of a canonical file reference ('/abs/task.py' or '/abs/task.py:attr')."""
    path_part = ref
    if ":" in ref and not (len(ref) > 1 and ref[1] == ":" and ref.count(":") == 1):
        path_part = ref.rsplit(":", 1)[0]
    return path_part


def task_record(task) -> dict:
    """What an index records about the task it was built from: the reference and, for a task
    file, its resolved absolute path and the sha256 of its bytes (None for a module)."""
    if isinstance(task, dict):  # already a record (e.g. read back from a shard's store)
        return dict(task=task.get("task"), task_sha256=task.get("task_sha256"))
    ref = task.ref if isinstance(task, Task) else str(task)
    sha = task.sha256 if isinstance(task, Task) else _LOADED.get(_file_part(ref))
    path = _file_part(ref)
    if sha is None and _is_hf(ref):  # named by the user for this build: its data's hash
        sha = _builder_fn(ref, "ref_sha256")(ref)
    elif sha is None and os.path.isabs(path) and os.path.isfile(path):
        sha = file_sha256(Path(path).read_bytes())
    return dict(task=ref, task_sha256=sha)


# -- consent: which task an index may run ---------------------------------------------------

def _is_hf(ref) -> bool:
    """A reference of a task built in code over recorded paths (BUILTIN_REF_BUILDERS)."""
    return isinstance(ref, str) and ref.startswith(tuple(BUILTIN_REF_BUILDERS))


def _name_hf_paths(or_task: bool = False) -> str:
    """How the caller names an hf-lm index's model directory and data file."""
    return spelled("--hf-model DIR --data FILE" + (" (or --task FILE)" if or_task else ""),
                   "task=grass_index.tasks.hf_lm.named_ref(DIR, FILE)")


def task_file_status(recorded: str | None, sha256: str | None, index_dir) -> str:
    """What an index records about its task, for messages and `info`: a short phrase. A
    recorded path is data: it is shown, never opened (not even to hash it) until the user
    names it on a command line (:func:`task_for_index` compares it then)."""
    if not recorded:
        return "no task recorded (built from Python)"
    if _is_hf(recorded):
        return ("a local model and data files: opened only when named again with "
                + _name_hf_paths())
    path = _file_part(str(recorded))
    if not os.path.isabs(path):
        return ("a module or relative path: never run unless named with "
                + spelled("--task", "task="))
    p = Path(path)
    try:
        inside = p.resolve().is_relative_to(Path(index_dir).resolve())
    except OSError:
        inside = False
    if inside:
        return ("a path inside the index directory: an index directory is data and never "
                "supplies code; do not run it")
    if sha256 is None:
        return "no content hash was recorded; not opened"
    return (f"sha256 {sha256[:12]} at build; not opened: name it with "
            + spelled("--task", "task=") + " to run it, and it is compared then")


def recorded_task_status(recorded: str | None, sha256: str | None, index_dir) -> str:
    """The task an index records, with :func:`task_file_status`, as one clause."""
    status = task_file_status(recorded, sha256, index_dir)
    if not recorded:
        return "the index records no task (built from Python)"
    return f"the index was built with task {safe_text(recorded)} ({status})"


BUILTIN_TASK_MODULES = ("grass_index.examples.digits",)


def is_builtin_task(ref: str | None) -> bool:
    """Whether ``ref`` names a task shipped inside this package (the bundled digits example):
    code the user installed with grass-index, so an index built from it may run it without
    --task. Only exact module names, or a path that resolves to the bundled file itself. Not
    an ``hf-lm:`` reference: its model and data paths are recorded in the directory, and a
    recorded path is opened only when the user names it (``--hf-model``, ``--data``)."""
    if not ref or not isinstance(ref, str):
        return False
    if ref in BUILTIN_TASK_MODULES:
        return True
    try:
        return Path(ref).resolve() == Path(default_task_ref()) and Path(ref).is_file()
    except (OSError, ValueError):
        return False


def task_for_index(given, *, recorded: str | None, sha256: str | None, index_dir,
                   command: str = "query") -> tuple[Task, str | None]:
    """Load the task the user named on the command line for an index; (task, note).

    Opening an index never runs the task it records: ``given`` is required (unless the record
    names a task shipped inside this package, :func:`is_builtin_task`), and the record is only
    shown. ``note`` is a warning to print when the named file differs from the one the index
    was built with. An index built with ``--hf-model``: ``given`` is the hf-lm reference of
    the paths the user named (``tasks.hf_lm.named_ref``), which must be the recorded ones with
    the recorded data sha256 (``tasks.hf_lm.task_for_recorded``)."""
    if given is None and is_builtin_task(recorded):
        given = recorded  # installed with grass-index itself, not supplied by the directory
    if given is not None and _is_hf(recorded) and _is_hf(str(given)):
        return _builder_fn(recorded, "task_for_recorded")(str(given), recorded, sha256), None
    if given is None and _is_hf(recorded):
        status = recorded_task_status(recorded, sha256, index_dir)
        raise TaskError(f"{command} loads the model and data the index was built from, and "
                        f"opening an index never opens a path it records by itself: {status}. "
                        f"Name them with {_name_hf_paths(or_task=True)}")
    if given is None:
        status = recorded_task_status(recorded, sha256, index_dir)
        name_it = spelled("--task FILE", "task='FILE' (a path, module name or loaded Task)")
        raise TaskError(f"{command} runs the task's code, and opening an index never runs code "
                        f"by itself: {status}. Name the task to run with {name_it} (the task "
                        "file or module the index was built from)")
    t = load_task(given)
    note = None
    if sha256 is not None and t.sha256 is not None and t.sha256 != sha256:
        note = (f"task {safe_text(t.ref)} differs from the task file the index was built with "
                f"(sha256 {t.sha256[:12]} now, {sha256[:12]} at build); scores are meaningful "
                "only if its model(), train_data() and loss() are unchanged")
    return t, note
