"""`grass-index tune DIR`: choose the preconditioner by LDS on a validation split of queries.

Kept in its own module; the main CLI wires it with ``tune_cmd.register(app)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .errors import errors, fail


def _numbers(text: str, what: str, cast):
    try:
        return [cast(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"{what} {text!r}: give numbers separated by commas")


def tune_command(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index directory made by "
                                     "`grass-index build`."),
    task: Optional[str] = typer.Option(None, "--task", help="Task file/module (default: the one "
                                       "recorded in the index). It must define train(subset, seed)."),
    num_subsets: int = typer.Option(50, "--subsets", "-m", help="Random training subsets M."),
    alpha: float = typer.Option(0.5, "--alpha", help="Fraction of the training set per subset."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Training seeds per subset (comma list)."),
    subset_seed: int = typer.Option(0, "--subset-seed", help="Seed that draws the subsets."),
    ground_truth: Optional[Path] = typer.Option(None, "--ground-truth", help="Cache of retrained "
                                                "models' losses (shared with `eval`; resumable)."),
    val_fraction: float = typer.Option(0.5, "--val-fraction", help="Share of the queries that "
                                       "choose; the rest is held out to report."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the validation split."),
    factors: str = typer.Option(",".join(f"{f:g}" for f in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1,
                                                             3, 10)),
                                "--factors", help="Damping factors × mean eigenvalue (comma list)."),
    scopes: Optional[str] = typer.Option(None, "--scopes", help="per-layer (eFIM, λ_l from each "
                                         "layer's mean eigenvalue), global (eFIM, one λ for all "
                                         "layers), ekfac (needs a factored spec with projection "
                                         "identity). Default: all that the index supports."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", help="Use only the first N "
                                              "query examples."),
    apply: bool = typer.Option(True, "--apply/--dry-run", help="Make the winner the index's "
                               "preconditioner (rewrites FAISS once) or only report."),
    extend: bool = typer.Option(True, "--extend/--no-extend", help="While a scope's best sits "
                                "at an edge of --factors, try factors beyond it (up to the "
                                "identity limit: λ = 100 × every layer's top eigenvalue)."),
    as_json: bool = typer.Option(False, "--json", help="Print the sweep as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Sweep identity, eFIM and EK-FAC dampings (1e-3…10 × mean eigenvalue, extended past an
    edge the best sits at) from the sketches, keep the best validation LDS, report it on
    held-out queries and record it in the index."""
    import grass_index as gi
    from grass_index.eval.tune import Extension

    seed_list = _numbers(seeds, "--seeds", int)
    factor_list = _numbers(factors, "--factors", float)
    scope_list = None if scopes is None else [s.strip() for s in scopes.split(",") if s.strip()]
    if not Path(index_dir).is_dir():
        fail(f"{index_dir} is not a directory; pass an index made by `grass-index build`")
    res = gi.open_index(index_dir).tune(task=task, num_subsets=num_subsets, alpha=alpha,
                                        seeds=seed_list, subset_seed=subset_seed,
                                        ground_truth=ground_truth, val_fraction=val_fraction,
                                        split_seed=split_seed, factors=factor_list,
                                        scopes=scope_list, max_queries=max_queries, apply=apply,
                                        progress=progress and not as_json, extend=extend)
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
        return
    from rich.table import Table

    from .errors import out
    tab = Table(title=f"LDS by preconditioner ({res.n_val} validation / {res.n_heldout} "
                      f"held-out queries, {res.n_subsets} subsets)")
    for col in ("candidate", "validation LDS", "held-out LDS"):
        tab.add_column(col)
    for c in res.grid:
        mark = " ◀" if c is res.choice else ""
        tab.add_row(c.name + mark, _fmt(c.val_lds), _fmt(c.heldout_lds))
    out.print(tab)
    for ext in res.extended:
        out.print(Extension(**ext).says())
    verb = "now the index's preconditioner" if res.applied else "not applied (--dry-run)"
    out.print(f"chose {res.choice.name}: validation {_fmt(res.choice.val_lds)}, held-out "
              f"{_fmt(res.choice.heldout_lds)}; {verb}")


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.4f}"


def register(app: typer.Typer) -> None:
    """Add the `tune` sub-command to the grass-index typer app."""
    app.command("tune")(errors(tune_command))
