"""`grass-index selective-mask fit TASK --out mask.pt --k 128*128`: learn a Selective Mask.

The main CLI wires it with ``selective_cmd.register(app)``; the mask file is then used by
``selective_mask-…`` specs (see grass_index.maskfit for the method).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import errors

selective_app = typer.Typer(help="Learn which gradient coordinates to keep (Selective Mask).",
                            no_args_is_help=True)


@selective_app.command("fit")
@errors
def fit_command(
    task: Optional[str] = typer.Argument(None, help="Task file/module (default: bundled digits)."),
    out: Path = typer.Option(..., "--out", help="Where to write the mask file (.pt)."),
    k: str = typer.Option(..., "--k", help="Mask size: k (flat) or k_in*k_out (factored for "
                          "linear layers), e.g. 128*128; clamped to each layer's size."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated parameter globs "
                                         "(default: every linear layer)."),
    n_samples: int = typer.Option(768, "--samples", help="Training examples the fit looks at "
                                  "(a third play queries, the rest estimate F)."),
    steps: int = typer.Option(300, "--steps", help="Optimisation steps per layer."),
    l1: float = typer.Option(0.1, "--l1", help="Sparsity penalty weight."),
    hessian: str = typer.Option("eFIM", "--hessian", help="The Hessian the index will use: eFIM "
                                "(match preconditioned scores) or identity (raw inner products)."),
    damping: str = typer.Option("auto", "--damping", help="The damping the index will use: "
                                "auto (the default) or a relative factor, e.g. 0.3."),
    seed: int = typer.Option(0, "--seed", help="Seed for the example sample and init."),
    batch_size: int = typer.Option(64, "--batch-size", help="Examples per forward/backward "
                                   "while collecting gradients (lower it for large models)."),
    memory_gb: float = typer.Option(2.0, "--memory-gb", help="Budget (GiB) for the gradients "
                                    "held while fitting; the peak is about 2.5x this plus the "
                                    "model and one batch. Layers are fitted one at a time."),
    as_json: bool = typer.Option(False, "--json", help='Print {"out", "layers": {name: {"in", '
                                 '"out"} or {"flat"}: kept sizes}, "passes"} on stdout.'),
) -> None:
    """Fit a sigmoid mask so masked-gradient attribution scores match the full ones; keep top-k."""
    from .. import fit_selective_mask, load_task, save_selective_mask

    t = load_task(task)
    lay = [p.strip() for p in layers.split(",")] if layers else None
    stats: dict = {}
    masks = fit_selective_mask(t.model(), t.train_data(), t.loss, k, layers=lay,
                               n_samples=n_samples, steps=steps, l1=l1, seed=seed,
                               hessian=hessian, damping=damping, collate=t.collate,
                               batch_size=batch_size, memory_gb=memory_gb, stats=stats)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_selective_mask(out, masks)
    if as_json:
        import json

        layers_out = {name: {key: len(v) for key, v in d.items()} for name, d in masks.items()}
        typer.echo(json.dumps({"out": str(out), "layers": layers_out,
                               "passes": stats.get("passes")}))
        return
    for name, d in masks.items():
        sizes = "*".join(str(len(d[key])) for key in ("in", "out") if key in d) or str(len(d["flat"]))
        typer.echo(f"layer {name}: keeps {sizes}")
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the `selective-mask` command group to the grass-index typer app."""
    app.add_typer(selective_app, name="selective-mask")
