"""What LDS against retrained models needs from a task and an index: the task to run (never
the one an index records unless named), its train(), its data checked against the index, and
the ground-truth cache directory. Shared by run_eval (run.py) and tune (tune.py); below the
façade: it takes an opened index and never opens one."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from ..task import TaskError, task_for_index
from .errors import EvalError


def task_train_fn(task) -> Callable:
    """The task's optional ``train(subset, seed)``, or an error saying how to add it."""
    fn = getattr(task, "train", None)
    if not callable(fn):
        ref = getattr(task, "ref", task)
        raise EvalError(f"task {ref} defines no train(train_data_subset, seed) -> nn.Module, which "
                        "LDS needs to retrain the model on subsets; add one to the task file that "
                        "trains a fresh model with the same recipe as model() (see "
                        "examples/digits.py)")
    return fn


def task_of_index(idx, task, command: str):
    """The task to run for index ``idx``: a loaded task as given, or the one named by ``task``
    (a reference). Never the task the index records unless the caller names it or it ships
    with grass-index (an index directory is data; see task.task_for_index)."""
    if task is not None and not isinstance(task, (str, os.PathLike)):
        return task
    try:
        t, _ = task_for_index(None if task is None else str(task), recorded=idx.task,
                              sha256=idx.record.task_sha256, index_dir=idx.path,
                              command=command)
    except TaskError as e:
        raise EvalError(str(e)) from e
    return t


def retraining_inputs(idx, task, command: str, verb: str):
    """(task, its train(), training data, query data) for LDS against retrained models on
    index ``idx``, each checked: the task must define train() and query_data(), and its
    training data must be the index's (``verb`` says what to redo with the right task)."""
    task = task_of_index(idx, task, command)
    train_fn = task_train_fn(task)
    if not task.has("query_data"):
        raise EvalError(f"task {task.ref} defines no query_data(); {command} scores queries "
                        "against retrained models, so add query_data() to the task file")
    train, query = task.train_data(), task.query_data()
    if len(train) != idx.n_train:
        raise EvalError(f"task {task.ref} has {len(train)} training examples but index "
                        f"{idx.path} has {idx.n_train}; {verb} with the task the index was "
                        "built from")
    return task, train_fn, train, query

def task_dependencies(task, **settings) -> dict:
    """What retrained losses depend on besides the data: the bytes of the task's code (its
    file's sha256; a module's source file's) and the retraining settings."""
    import inspect

    from ..task import task_record

    sha = task_record(task).get("task_sha256")
    if sha is None:  # a module task: the source file it was imported from
        try:
            src = inspect.getsourcefile(task.source if inspect.ismodule(task.source)
                                        else type(task.source))
            sha = hashlib.sha256(Path(src).read_bytes()).hexdigest() if src else None
        except (TypeError, OSError):
            sha = None
    return dict(task_sha256=sha, **settings)


def ground_truth_for(task, train, query, train_fn, masks, seeds, ground_truth, *, m: int,
                     alpha: float, subset_seed: int, progress):
    """(cached ground truth, its directory) for ``task``: keyed by content (the task's code,
    every example, the settings), so an edited train()/query_data() never reuses old losses."""
    from .groundtruth import content_key, content_record, train_ground_truth

    depends = task_dependencies(task, m=m, alpha=alpha, subset_seed=subset_seed)
    gt_dir = Path(ground_truth) if ground_truth else default_ground_truth_dir(
        task.ref, m, alpha, subset_seed,
        content=content_key(content_record(train, query, depends)))
    gt = train_ground_truth(train_fn, train, query, task.loss, masks, list(seeds), gt_dir,
                            progress, collate=task.collate, tag=task.ref, depends_on=depends)
    return gt, gt_dir


def default_ground_truth_dir(task_ref: str, m: int, alpha: float, subset_seed: int,
                             content: str = "") -> Path:
    """Per-task, per-content cache under $GRASS_INDEX_CACHE (shared by every index of the same
    task, code and data)."""
    root = Path(os.environ.get("GRASS_INDEX_CACHE", Path.home() / ".cache" / "grass-index"))
    key = hashlib.sha1((task_ref + content).encode()).hexdigest()[:10]
    stem = Path(task_ref.split(":")[0]).stem or "task"
    return root / "lds" / f"{stem}-{key}-m{m}-a{alpha:g}-s{subset_seed}"
