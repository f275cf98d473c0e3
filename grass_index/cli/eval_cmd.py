"""`grass-index eval DIR`: linear datamodeling score (LDS) of an index.

Kept in its own module; the main CLI wires it with ``eval_cmd.register(app)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .errors import errors, fail


def eval_command(
    index_dir: Path = typer.Argument(..., help="Index directory made by `grass-index build`."),
    task: Optional[str] = typer.Option(None, "--task", help="Task file/module the index was built "
                                       "from (required: opening an index never runs code by "
                                       "itself). It must define train(subset, seed)."),
    num_subsets: int = typer.Option(50, "--subsets", "-m", help="Number of random training subsets M."),
    alpha: float = typer.Option(0.5, "--alpha", help="Fraction of the training set in each subset."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Training seeds per subset (comma list); "
                              "losses are averaged over them."),
    subset_seed: int = typer.Option(0, "--subset-seed", help="Seed that draws the subsets."),
    ground_truth: Optional[Path] = typer.Option(None, "--ground-truth", help="Cache directory for "
                                                "retrained-model losses (resumable; default under "
                                                "$GRASS_INDEX_CACHE/lds/)."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", help="Score only the first N "
                                              "query examples."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Linear datamodeling score: Spearman ρ between summed scores and -loss of models retrained
    on random subsets, averaged over query examples. 1 = perfect, 0 = no signal."""
    from .. import run_eval

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {seeds!r}: give integers separated by commas, e.g. 0,1,2")
    if not Path(index_dir).is_dir():
        fail(f"{index_dir} is not a directory; pass an index made by `grass-index build`")
    res = run_eval(index_dir, task=task, num_subsets=num_subsets, alpha=alpha, seeds=seed_list,
                   subset_seed=subset_seed, ground_truth=ground_truth, max_queries=max_queries,
                   progress=progress and not as_json)
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
        return
    typer.echo(f"LDS {res.lds:.4f}  (± {res.to_dict()['per_query_std']:.3f} across "
               f"{res.n_query} queries; {res.n_subsets} subsets of alpha={res.alpha:g}, "
               f"seeds {','.join(map(str, res.seeds))})")
    typer.echo(f"ground truth: {res.ground_truth_dir}  "
               f"({res.seconds['ground_truth']:.1f}s; score {res.seconds['score']:.1f}s)")


def register(app: typer.Typer) -> None:
    """Add the `eval` sub-command to the grass-index typer app."""
    app.command("eval")(errors(eval_command))
