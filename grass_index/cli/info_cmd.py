"""`grass-index info` and `verify`: how an index was built, and whether its parts agree."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import EXIT_ERROR, err, errors, out, safe, shell_arg
from .render import emit_json
from .task_opts import data_option, hf_model_option, named_task


def info(directory: Path = typer.Argument(..., metavar="DIR"),
         json_mode: bool = typer.Option(False, "--json")):
    """Show how an index was built (task, specs, per-layer dims and clamping, damping, counts)."""
    import grass_index as gi

    d = gi.describe_index(directory)
    if json_mode:
        emit_json(d)
        return
    if not d["complete"]:
        b = d["build"]
        out.print(f"[yellow]build in progress or interrupted[/]: {d['committed_blocks']} of "
                  f"{d['n_blocks']} batches sketched ({b['n_train']} examples, "
                  f"{safe(b['sparsification'])} / {safe(b['projection'])}); re-run the "
                  "build to resume")
        return
    from .render import print_index

    print_index(gi.IndexConfig(d["config"]), directory=directory, details=True)


def verify(directory: Path = typer.Argument(..., metavar="DIR"),
           repair: bool = typer.Option(False, "--repair", help="Rebuild the preconditioner and "
                                       "FAISS index from the stored sketches; restore "
                                       "config.json/build.json from the store's records."),
           task: Optional[str] = typer.Option(None, "--task", "-t", help="With --repair: the "
                                              "task the index was built from, to recompute "
                                              "sketch blocks damaged on disk."),
           hf_model: Optional[Path] = hf_model_option(),
           data: Optional[Path] = data_option(),
           json_mode: bool = typer.Option(False, "--json")):
    """Check counts, sketches, LMDB vs FAISS agreement, config hash, preconditioner."""
    import grass_index as gi

    rep = gi.verify_index(directory, repair=repair, task=named_task(task, hf_model, data))
    if json_mode:
        emit_json(rep)
    else:
        for c in rep["checks"]:
            mark = "[green]ok[/]  " if c["ok"] else "[red]FAIL[/]"
            out.print(f"{mark} {c['name']}: {safe(c['detail'])}")
        for r in rep["repaired"]:
            out.print(f"[cyan]repair:[/] {safe(r)}")
        out.print("[green]index is consistent[/]" if rep["ok"] else
                  f"[red]index has problems[/]; try `grass-index verify {shell_arg(directory)} "
                  "--repair`")
    if not rep["ok"]:
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    """Add `info`, `verify` to the grass-index typer app."""
    app.command("info")(errors(info))
    app.command("verify")(errors(verify))
