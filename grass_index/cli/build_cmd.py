"""`grass-index build`, `plan` and `merge`: make an index (in one process, or as shards
merged afterwards) and see beforehand what it will cost (`plan`: cli/plan_cmd.py)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EXIT_ERROR, err, errors, fail, out as stdout, safe, shell_arg
from .render import emit_json, report_index


def build(
    task: Optional[str] = typer.Argument(None, help="Task file (.py), module or module:attr. "
                                         "Default: the bundled digits example."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Index directory "
                                       "(default runs/<task name>)."),
    sparsification: str = typer.Option("random_mask-128*128", help="Sparsification spec."),
    projection: str = typer.Option("sjlt-4096", help="Projection spec."),
    hessian: str = typer.Option("eFIM", help="eFIM, ekfac (a factored sparsification with "
                                "--projection identity) or identity."),
    damping: str = typer.Option("auto", help="auto (λ per layer from its Fisher's spectrum, "
                                "docs/damping.md; auto:M sets the multiple), a relative "
                                "damping (x mean eigenvalue, e.g. 0.3) or abs:VALUE."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    layers: Optional[List[str]] = typer.Option(None, "--layers", help="Parameter-name globs "
                                               "(repeatable or comma-separated)."),
    seed: int = typer.Option(0),
    index: str = typer.Option("flat", help="flat (exact) or ivf (approximate, large corpora), "
                              "optionally :fp16 (half the memory and disk) and/or shards=N (N "
                              "files searched as one), e.g. ivf:fp16,shards=4."),
    device: Optional[str] = typer.Option(None, help="torch device for gradients, e.g. cuda."),
    selective_mask: Optional[Path] = typer.Option(
        None, "--selective-mask", help="Mask file from `grass-index selective-mask fit`; "
        "needed by selective_mask-... specs."),
    worker: Optional[str] = typer.Option(
        None, "--worker", help="I/N: sketch only worker I's share of the batches (I = 0..N-1, "
        "e.g. one SLURM array task each) into DIR/shards/; then `grass-index merge DIR`."),
    remove_shards: bool = typer.Option(False, "--remove-shards", help="Under torchrun: delete "
                                       "DIR/shards once rank 0 has merged them (they double "
                                       "the disk)."),
    json_mode: bool = typer.Option(False, "--json", help="Print the config as JSON on stdout."),
    check: bool = typer.Option(False, "--check", help="Build nothing: check how each selected "
                               "layer is captured on the first examples, print the table; exit "
                               "1 (naming the --layers glob to exclude) if one is not exact."),
    hf_model: Optional[Path] = typer.Option(None, "--hf-model", help="A local Hugging Face "
                                            "causal LM directory (save_pretrained) instead of "
                                            "a task file; needs --data."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --hf-model: .txt (one "
                                        "example per line), .jsonl (--text-field) or a "
                                        "datasets.save_to_disk directory."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="JSON/datasets field "
                                             "holding the text (default: text)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="With --hf-model: "
                                             "tokens per example (longer ones are truncated; "
                                             "default 128, or the model's context if "
                                             "shorter)."),
    dtype: str = typer.Option("float32", "--dtype", help="With --hf-model: float32, bfloat16 "
                              "or float16."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Processes that read "
                                          "and collate batches ahead of pass 1 (default: by "
                                          "CPU count; 0: in this process)."),
):
    """Sketch every training example's gradient, precondition, and index (resumable).

    Under torchrun (e.g. torchrun --nproc_per_node=4 -m grass_index build TASK --out DIR)
    every rank sketches its share and the ranks finish the index together; rank 0 reports."""
    import grass_index as gi

    t, out = _build_task(task, out, hf_model=hf_model, data=data, text_field=text_field,
                         max_length=max_length, dtype=dtype)
    options = gi.BuildOptions(sparsification=sparsification, projection=projection, seed=seed,
                              layers=layers or None, batch_size=batch_size,
                              selective_mask=selective_mask, workers=workers)
    if layers and not options.layers:
        fail("--layers is empty; pass globs such as --layers '0.*' or --layers 'fc1.*,fc2.*'")
    index_options = gi.IndexOptions(hessian=hessian, damping=damping, index=index)
    model, train, t0 = t.index_model(), t.train_data(), time.perf_counter()
    if check:
        return _check(t, model, train, options, device=device, json_mode=json_mode, t0=t0)
    if worker is not None:  # a shard, not an index
        return _shard(t, model, train, out, worker, options, index_options, device=device,
                      json_mode=json_mode, t0=t0, remove_shards=remove_shards)
    idx = gi.build_index(model, train, t.loss, out, sparsification=options.sparsification,
                         projection=options.projection, hessian=index_options.hessian,
                         damping=damping, batch_size=options.batch_size, seed=options.seed,
                         layers=options.layers, collate=t.collate, index=index_options.index,
                         task=t.ref, device=device, selective_mask=selective_mask,
                         remove_shards=remove_shards, workers=workers)
    if idx.reporting:  # torchrun: rank 0 reports
        report_index("built", out, idx.config, time.perf_counter() - t0, json_mode)


def _build_task(task, out, *, hf_model, data, text_field, max_length, dtype):
    """(the task, the output directory): a task file/module, or --hf-model DIR with --data."""
    import grass_index as gi

    if hf_model is not None or data is not None:  # -- language models, no task file --
        if task is not None or hf_model is None or data is None:
            fail("--hf-model DIR and --data FILE go together, instead of a TASK")
        t = gi.hf_lm_task(hf_model, data, text_field=text_field, max_length=max_length,
                          dtype=dtype)
        return t, out or Path("runs") / Path(hf_model).name
    t = gi.load_task(task)
    if out is None:
        stem = Path(t.ref.split(":")[0]).stem if task else "digits"
        out = Path("runs") / stem
    return t, out


def _check(t, model, train, options, *, device, json_mode: bool, t0: float):
    """`build --check`: the capture table (exit 1 when a layer is not captured exactly)."""
    import grass_index as gi
    from .render import print_capture_check

    rep = gi.check_capture(model, train, t.loss, options, collate=t.collate, device=device)
    if json_mode:
        emit_json(dict(rep.to_dict(), seconds=round(time.perf_counter() - t0, 3)))
    else:
        print_capture_check(rep)
    if not rep.ok:
        raise typer.Exit(EXIT_ERROR)


def _shard(t, model, train, out, worker, options, index_options, *, device, json_mode: bool,
           t0: float, remove_shards: bool):
    """`build --worker I/N`: sketch one shard, say what comes next."""
    import grass_index as gi

    if remove_shards:
        fail("--remove-shards applies to torchrun builds and merge; a --worker build's shard "
             "is what merge needs")

    info = gi.build_shard(model, train, t.loss, out, worker, options, index_options,
                          task=t.ref, collate=t.collate, device=device)
    secs = time.perf_counter() - t0
    if json_mode:
        emit_json(dict(info.to_dict(), seconds=round(secs, 3)))
        return
    stdout.print(f"sketched shard {info.shard} of [bold]{safe(out)}[/]: {info.batches} "
              f"of {info.n_batches} batches ({info.rows} examples), {secs:.1f} s")
    err.print(f"next, once every worker is done: grass-index merge {shell_arg(out)}")


def merge(
    directory: Path = typer.Argument(..., help="The --out DIR of `build --worker I/N` (or the "
                                     "DIR of `add DIR --worker I/N`)."),
    shards: Optional[int] = typer.Option(None, "--shards", min=1, help="Merge the I-of-N shards "
                                         "with this N (default: the only split present)."),
    hessian: Optional[str] = typer.Option(None, help="eFIM, ekfac or identity (default: as the "
                                          "workers were given)."),
    damping: Optional[str] = typer.Option(None, help="Damping (default: as the workers were "
                                          "given)."),
    index: Optional[str] = typer.Option(None, help="e.g. flat, ivf, ivf:fp16, "
                                        "flat:fp16,shards=4 (default: as the workers were "
                                        "given)."),
    remove_shards: bool = typer.Option(False, "--remove-shards", help="Delete DIR/shards once "
                                       "the index is written."),
    json_mode: bool = typer.Option(False, "--json", help="Print the config as JSON on stdout."),
):
    """Finish a `build --worker I/N` build once all N shards exist: precondition and index.
    Or an `add --worker I/N` once all N add shards exist: commit the next generation."""
    import grass_index as gi

    t0 = time.perf_counter()
    idx = gi.merge_shards(directory, shards=shards, hessian=hessian, damping=damping,
                          index=index, remove_shards=remove_shards)
    report_index("merged", directory, idx.config, time.perf_counter() - t0, json_mode)


def register(app: typer.Typer) -> None:
    """Add `build`, `plan`, `merge` to the grass-index typer app."""
    app.command("build")(errors(build))
    from .plan_cmd import plan

    app.command("plan")(errors(plan))
    app.command("merge")(errors(merge))
