"""`grass-index self-influence DIR`: training examples ranked by g_iᵀ(F+λI)⁻¹g_i.

Kept in its own module; the main CLI wires it with ``self_influence_cmd.register(app)``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from .errors import errors, fail, out, safe
from .task_opts import data_option, hf_model_option, named_task

log = logging.getLogger("grass_index")


def self_influence_command(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index directory made by "
                                     "`grass-index build`."),
    top_k: Optional[int] = typer.Option(20, "--top-k", "-k", help="How many to list (highest "
                                        "first); 0 lists every training example."),
    task: Optional[str] = typer.Option(None, "--task", help="Task file for labels (the task the "
                                       "index was built from; without it, labels only for a "
                                       "task shipped with grass-index)."),
    hf_model: Optional[Path] = hf_model_option(),
    data: Optional[Path] = data_option(),
    labels: bool = typer.Option(True, "--labels/--no-labels", help="Look up each example's "
                                "label with the task's label(item)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"results": [{"train_id", '
                                 '"score", "label"}, ...]}, highest score first.'),
) -> None:
    """Training examples ranked by self-influence (mislabelled and atypical examples first),
    from the stored sketches: no gradient is recomputed."""
    rows, t = _ranked(index_dir, top_k, named_task(task, hf_model, data), labels)
    results = [dict(train_id=i, score=s, label=lab) for i, s, lab in rows]
    if as_json:
        typer.echo(json.dumps({"index": str(index_dir), "results": results}))
        return
    from rich.table import Table

    # a label is training data and the path a user's: shown as text, never as markup or
    # terminal control sequences
    tab = Table(title=f"{safe(index_dir)}: highest self-influence")
    for col in ("rank", "train id", "self-influence", "label"):
        tab.add_column(col)
    for rank, r in enumerate(results, 1):
        tab.add_row(str(rank), str(r["train_id"]), f"{r['score']:.4g}",
                    safe(r["label"] if r["label"] is not None else ""))
    out.print(tab)


def _ranked(index_dir: Path, top_k, task_ref, want_labels):
    import grass_index as gi
    from grass_index.analysis import rank_self_influence
    from grass_index.task import is_builtin_task, task_for_index

    if top_k is not None and top_k < 0:
        fail(f"--top-k {top_k}: give a positive number, or 0 for every example")
    idx = gi.open_index(index_dir)
    ranked = rank_self_influence(idx.self_influence().numpy(), top_k or None)
    t = None
    if want_labels and (task_ref or is_builtin_task(idx.task)):
        # labels run the task's code: only a task named here (or shipped with grass-index)
        t, note = task_for_index(task_ref, recorded=idx.task,
                                 sha256=idx.config.get("task_sha256"), index_dir=idx.path,
                                 command="self-influence")
        if note:
            log.warning("%s", note)
        if len(t.train_data()) != idx.n_train:
            fail(f"task {t.ref} has {len(t.train_data())} training examples, index "
                             f"{index_dir} {idx.n_train}; pass the task it was built from "
                             "(--task) or --no-labels")
    train = t.train_data() if t is not None and t.has("label") else None
    return [(i, s, t.label(train[i]) if train is not None else None) for i, s in ranked], t


def register(app: typer.Typer) -> None:
    """Add the `self-influence` sub-command to the grass-index typer app."""
    app.command("self-influence")(errors(self_influence_command))
