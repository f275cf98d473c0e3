"""The `grass-index` command (also `python -m grass_index`): a thin layer over the Python API
(the names ``import grass_index`` exports) and grass_index.fileio for writing its outputs.

Human output and progress go to stderr; ``--json`` writes one document to stdout. Every failure
is one readable line on stderr (the problem and the fix) and exit code 1.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from .errors import EXIT_ERROR, err, errors, fail, safe, shell_arg

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Training-data attribution: which training examples made the model do this?")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details to stderr.")):
    """grass-index: build an attribution index once, then query it in milliseconds."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _emit_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


# ------------------------------------------------------------------------------- build

@app.command()
@errors
def build(
    task: Optional[str] = typer.Argument(None, help="Task file (.py), module or module:attr. "
                                         "Default: the bundled digits example."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Index directory "
                                       "(default runs/<task name>)."),
    sparsification: str = typer.Option("random_mask-128*128", help="Sparsification spec."),
    projection: str = typer.Option("sjlt-4096", help="Projection spec."),
    hessian: str = typer.Option("eFIM", help="eFIM or identity."),
    damping: Optional[str] = typer.Option(None, help="Relative damping (x mean eigenvalue), or "
                                          "abs:VALUE. Default: the library default."),
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
    hf_model: Optional[Path] = typer.Option(None, "--hf-model", help="A local Hugging Face "
                                            "causal LM directory (save_pretrained) instead of "
                                            "a task file; needs --data."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --hf-model: .txt (one "
                                        "example per line), .jsonl (--text-field) or a "
                                        "datasets.save_to_disk directory."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="JSON/datasets field "
                                             "holding the text (default: text)."),
    max_length: int = typer.Option(128, "--max-length", help="With --hf-model: tokens per "
                                   "example (longer ones are truncated)."),
    dtype: str = typer.Option("float32", "--dtype", help="With --hf-model: float32, bfloat16 "
                              "or float16."),
):
    """Sketch every training example's gradient, precondition, and index (resumable).

    Under torchrun (e.g. torchrun --nproc_per_node=4 -m grass_index build TASK --out DIR)
    every rank sketches its share and the ranks finish the index together; rank 0 reports."""
    import grass_index as gi

    if hf_model is not None or data is not None:  # -- language models, no task file --
        if task is not None or hf_model is None or data is None:
            fail("--hf-model DIR and --data FILE go together, instead of a TASK")
        t = gi.hf_lm_task(hf_model, data, text_field=text_field, max_length=max_length,
                          dtype=dtype)
        out = out or Path("runs") / Path(hf_model).name
    else:
        t = gi.load_task(task)
    if out is None:
        stem = Path(t.ref.split(":")[0]).stem if task else "digits"
        out = Path("runs") / stem
    options = gi.BuildOptions(sparsification=sparsification, projection=projection, seed=seed,
                              layers=layers or None, batch_size=batch_size,
                              selective_mask=selective_mask)
    if layers and not options.layers:
        fail("--layers is empty; pass globs such as --layers '0.*' or --layers 'fc1.*,fc2.*'")
    index_options = gi.IndexOptions(hessian=hessian, damping=damping, index=index)
    model = t.index_model()
    data = t.train_data()
    t0 = time.perf_counter()
    if worker is not None:  # a shard, not an index
        if remove_shards:
            fail("--remove-shards applies to torchrun builds and merge; a --worker build's "
                 "shard is what merge needs")
        info = gi.build_shard(model, data, t.loss, out, worker, options, index_options,
                              task=t.ref, collate=t.collate, device=device)
        secs = time.perf_counter() - t0
        if json_mode:
            _emit_json(dict(info.to_dict(), seconds=round(secs, 3)))
            return
        err.print(f"sketched shard {info.shard} of [bold]{safe(out)}[/]: {info.batches} "
                  f"of {info.n_batches} batches ({info.rows} examples), {secs:.1f} s")
        err.print(f"next, once every worker is done: grass-index merge {shell_arg(out)}")
        return
    idx = gi.build_index(model, data, t.loss, out, sparsification=options.sparsification,
                         projection=options.projection, hessian=index_options.hessian,
                         damping=damping, batch_size=options.batch_size, seed=options.seed,
                         layers=options.layers, collate=t.collate, index=index_options.index,
                         task=t.ref, device=device, selective_mask=selective_mask,
                         remove_shards=remove_shards)
    if idx.reporting:  # torchrun: rank 0 reports
        _report_index("built", out, idx.config, time.perf_counter() - t0, json_mode)


@app.command()
@errors
def plan(
    task: Optional[str] = typer.Argument(None, help="Task file (.py), module or module:attr."),
    hf_model: Optional[Path] = typer.Option(None, "--hf-model", help="A local HF causal LM "
                                            "directory instead of a task file (with --data)."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --hf-model: the corpus."),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    max_length: int = typer.Option(128, "--max-length"),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Examples (default: the task's "
                                    "training set size)."),
    sparsification: str = typer.Option("random_mask-128*128"),
    projection: str = typer.Option("sjlt-4096"),
    layers: Optional[List[str]] = typer.Option(None, "--layers"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    index: str = typer.Option("flat"),
    out: Path = typer.Option(Path("runs"), "--out", help="Where the index would go (free disk "
                             "is checked there)."),
    json_mode: bool = typer.Option(False, "--json"),
):
    """RAM and disk a build would need, for the given projection and two narrower ones side by
    side — without building (no gradients)."""
    import grass_index as gi
    from grass_index import plan as plan_mod

    if hf_model is not None:
        if data is None:
            fail("--hf-model DIR needs --data FILE")
        t = gi.hf_lm_task(hf_model, data, text_field=text_field, max_length=max_length)
    else:
        t = gi.load_task(task)
    options = gi.BuildOptions(sparsification=sparsification, projection=projection,
                              layers=layers or None, batch_size=batch_size)
    model = t.index_model()
    train = t.train_data() if n is None or hf_model is not None else None
    count = n or len(train)
    tokens = max_length if hf_model is not None else 1
    if hf_model is not None:
        tokens = max(len(train[i]) for i in range(min(len(train), 256)))
    cols = {p: plan_mod.plan_for(model, count, sparsification=options.sparsification,
                                 projection=p, layers=options.layers,
                                 batch_size=options.batch_size, index=index, tokens=tokens)
            for p in plan_mod.variants(projection)}
    ram, disk = plan_mod.available_ram(), plan_mod.free_disk(out)
    if json_mode:
        _emit_json(dict(n=count, available_ram=ram, free_disk=disk,
                        plans={p: dict(ram_peak=c.ram_peak, disk=c.disk, K=c.K,
                                       store=c.store_disk, fisher=c.fisher_disk,
                                       preconditioner=c.precond_disk, index=c.index_disk)
                               for p, c in cols.items()}))
        return
    from rich.table import Table

    ens = f", {len(model)} checkpoints" if isinstance(model, gi.Checkpoints) else ""
    tab = Table(title=f"plan: {count:,} examples{ens}, --index {index}")
    tab.add_column("")
    for p in cols:
        tab.add_column(f"--projection {p}", justify="right")
    rows = [c.rows() for c in cols.values()]
    for i, (name, _) in enumerate(rows[0]):
        tab.add_row(name, *[r[i][1] for r in rows])
    fits = ["yes" if plan_mod.shortfall(c, ram=ram, disk=disk, K_per_layer=1) is None else "no"
            for c in cols.values()]
    tab.add_row("fits here", *fits)
    err.print(tab)
    err.print(f"available now: RAM {ram / 1e9 if ram else float('nan'):.1f} GB, disk at {out} "
              f"{disk / 1e9:.1f} GB")


def _report_index(verb: str, directory, cfg: dict, secs: float, json_mode: bool) -> None:
    """What `build` and `merge` print for a finished index: the config as JSON, or a summary."""
    import grass_index as gi

    from .render import print_index

    if json_mode:
        _emit_json(dict(cfg, seconds=round(secs, 3)))
        return
    print_index(err, gi.IndexConfig(cfg), directory=directory, verb=verb, secs=secs)


@app.command()
@errors
def merge(
    directory: Path = typer.Argument(..., help="The --out DIR of `build --worker I/N`."),
    shards: Optional[int] = typer.Option(None, "--shards", min=1, help="Merge the I-of-N shards "
                                         "with this N (default: the only split present)."),
    hessian: Optional[str] = typer.Option(None, help="eFIM or identity (default: as the "
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
    """Finish a `build --worker I/N` build once all N shards exist: precondition and index."""
    import grass_index as gi

    t0 = time.perf_counter()
    idx = gi.merge_shards(directory, shards=shards, hessian=hessian, damping=damping,
                          index=index, remove_shards=remove_shards)
    _report_index("merged", directory, idx.config, time.perf_counter() - t0, json_mode)


# ------------------------------------------------------------------------------- query

def _examples(idx, t, example: Optional[List[int]], input_file: Optional[Path], split: str,
              all_default: bool):
    """(example numbers, items, source name) for query/score."""
    if input_file is not None:
        if example:
            fail("pass either --example or --input, not both")
        import grass_index as gi

        items = gi.load_examples(input_file, name=f"--input {input_file}")
        return list(range(len(items))), items, str(input_file)
    if split not in ("query", "train"):
        fail(f"--split {split!r}: use query or train")
    data = t.query_data() if split == "query" else _train_data_of_index(t, idx)
    ids = list(example) if example else (list(range(len(data))) if all_default else [0])
    for i in ids:
        if not 0 <= i < len(data):
            fail(f"--example {i} is out of range: the {split} data has {len(data)} examples "
                 f"(0..{len(data) - 1})")
    return ids, [data[i] for i in ids], f"{split}_data"


def _check_normalize(mode: str) -> str:
    from grass_index.analysis.normalize import check_normalize

    return check_normalize(mode)


_TASK_HELP = ("Task file (.py), module or module:attr to run: the one the index was built "
              "from. Required: opening an index never runs code by itself (`info` shows the "
              "task the index records).")


def _open_with_task(directory: Path, task: Optional[str], command: str):
    """The index and the task the user named (never the one the index records, unasked)."""
    import grass_index as gi
    from grass_index.task import task_for_index

    idx = gi.open_index(directory)
    t, note = task_for_index(task, recorded=idx.task, sha256=idx.config.get("task_sha256"),
                             index_dir=directory, command=command)
    if note:
        err.print(f"[yellow]warning:[/] {safe(note)}")
    return idx, t


@app.command()
@errors
def query(
    directory: Path = typer.Argument(..., metavar="DIR", help="Index directory."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help=_TASK_HELP),
    example: Optional[List[int]] = typer.Option(None, "--example", "-e",
                                                help="Example number(s) in the task's query data."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="Examples file (.pt/.npy/.npz)."),
    split: str = typer.Option("query", help="Where --example points: query or train data."),
    top_k: int = typer.Option(10, "--top-k", "-k", min=1),
    opponents: bool = typer.Option(False, "--opponents", help="Also list the most negative."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="IVF indexes: lists to "
                                         "search (more: higher recall, slower); default: the "
                                         "index's, whose recall `info` shows."),
    normalize: str = typer.Option("none", "--normalize", help="none: influence scores; "
                                  "cosine: unit-norm query and preconditioned training vectors "
                                  "(relative influence; exact search over a second index)."),
    json_mode: bool = typer.Option(False, "--json"),
    png: Optional[Path] = typer.Option(None, "--png", help="Draw query + proponents/opponents "
                                       "(tasks with image(item))."),
    text: Optional[List[str]] = typer.Option(None, "--text", help="Query text (repeatable; "
                                             "indexes built with --hf-model)."),
):
    """Top-k training examples that most helped (proponents) or hurt (opponents) each example."""
    normalize = _check_normalize(normalize)
    idx, t = _open_with_task(directory, task, "query")
    if text:  # -- raw text queries (--hf-model indexes) --
        if example or input_file is not None:
            fail("pass --text, --example or --input, not several")
        if not t.has("encode"):
            fail(f"the task of index {directory} cannot turn text into examples; --text needs an "
                 "index built with --hf-model (or a task with encode(text)); or give --example "
                 "/ --input")
        ids, items, source = list(range(len(text))), [t.encode(s) for s in text], "text"
    else:
        ids, items, source = _examples(idx, t, example, input_file, split, all_default=False)
    model = t.index_model()
    t0 = time.perf_counter()
    q = idx.query_sketches(model, items, t.loss, collate=t.collate)
    pro = idx.search(q, top_k, nprobe=nprobe, normalize=normalize)
    opp = (idx.search(q, top_k, opponents=True, nprobe=nprobe, normalize=normalize)
           if opponents else None)
    ms = 1000 * (time.perf_counter() - t0) / max(1, len(items))
    train = None

    def lab(i):
        nonlocal train
        if not t.has("label"):
            return None
        train = train if train is not None else _train_data_of_index(t, idx)
        return t.label(train[i])

    results = []
    for r, (i, item) in enumerate(zip(ids, items)):
        res = dict(example=i, source=source, label=t.label(item) if t.has("label") else None,
                   proponents=[dict(train_id=j, score=s, label=lab(j)) for j, s in pro[r]])
        if opp is not None:
            res["opponents"] = [dict(train_id=j, score=s, label=lab(j)) for j, s in opp[r]]
        results.append(res)

    if png is not None:
        _draw(png, t, items, results, idx)
    if json_mode:
        _emit_json(dict(index=str(directory), task=idx.task, k=top_k, ms_per_example=round(ms, 3),
                        normalize=normalize, results=results))
        return
    from rich.table import Table

    for res in results:
        title = f"{res['source']}[{res['example']}]" + (f" ({res['label']})" if res["label"] else "")
        for kind in ("proponents", "opponents"):
            if kind not in res:
                continue
            tab = Table(title=safe(f"{title}: top {kind}"))
            tab.add_column("rank")
            tab.add_column("train id")
            tab.add_column("score")
            if t.has("label"):
                tab.add_column("label")
            for rank, row in enumerate(res[kind], 1):
                cells = [str(rank), str(row["train_id"]), f"{row['score']:+.4g}"]
                if t.has("label"):
                    cells.append(str(row["label"]))
                tab.add_row(*(safe(c) for c in cells))
            err.print(tab)
    err.print(f"{ms:.1f} ms per example")


def _train_data_of_index(t, idx):
    """The task's training data, which train ids index into: it must be the indexed set."""
    data = t.train_data()
    if len(data) != idx.n_train:
        fail(f"task {t.ref} has {len(data)} training examples but index {idx.path} was built "
              f"over {idx.n_train}: the training data changed since the build, so train ids "
              "would point at other examples; pass the task the index was built from, or "
              "rebuild the index")
    return data


def _draw(path: Path, t, items, results, idx) -> None:
    from ..images import BLUE, GREEN, RED, fmt_score, render

    if not t.has("image"):
        err.print(f"[yellow]warning:[/] task {safe(t.ref)} defines no image(item); "
                  "--png skipped")
        return
    train = _train_data_of_index(t, idx)
    rows = []
    for item, res in zip(items, results):
        rows.append(("Q", [(t.image(item), f"#{res['example']}", BLUE)]))
        rows.append(("P", [(t.image(train[r["train_id"]]), fmt_score(r["score"]), GREEN)
                           for r in res["proponents"]]))
        if res.get("opponents"):
            rows.append(("O", [(t.image(train[r["train_id"]]), fmt_score(r["score"]), RED)
                               for r in res["opponents"]]))
    render(rows, path)
    err.print(f"wrote {safe(path)}")


# ------------------------------------------------------------------------------- score

@app.command()
@errors
def score(
    directory: Path = typer.Argument(..., metavar="DIR"),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the .npy matrix."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help=_TASK_HELP),
    input_file: Optional[Path] = typer.Option(None, "--input", help="Examples file instead of "
                                              "the task's query data."),
    split: str = typer.Option("query", help="query or train data (without --input)."),
    normalize: str = typer.Option("none", "--normalize", help="none: influence scores; "
                                  "cosine: unit-norm query and preconditioned training vectors "
                                  "(relative influence; exact search over a second index)."),
    json_mode: bool = typer.Option(False, "--json"),
):
    """All query examples x all training examples, as float32 [n_query, n_train] in a .npy."""
    import numpy as np

    normalize = _check_normalize(normalize)
    idx, t = _open_with_task(directory, task, "score")
    _, items, source = _examples(idx, t, None, input_file, split, all_default=True)
    from grass_index.fileio import atomic_save

    model = t.index_model()
    t0 = time.perf_counter()
    s = idx.score(model, items, t.loss, collate=t.collate, normalize=normalize).numpy()
    secs = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, lambda f: np.save(f, s))
    if json_mode:
        _emit_json(dict(out=str(out), shape=list(s.shape), source=source, seconds=round(secs, 3)))
    else:
        err.print(safe(f"wrote {out}: scores [{s.shape[0]} {source} x {s.shape[1]} train] "
                          f"in {secs:.1f} s"))


# ------------------------------------------------------------------------------- info

@app.command()
@errors
def info(directory: Path = typer.Argument(..., metavar="DIR"),
         json_mode: bool = typer.Option(False, "--json")):
    """Show how an index was built (task, specs, per-layer dims and clamping, damping, counts)."""
    import grass_index as gi

    d = gi.describe_index(directory)
    if json_mode:
        _emit_json(d)
        return
    if not d["complete"]:
        b = d["build"]
        err.print(f"[yellow]build in progress or interrupted[/]: {d['committed_blocks']} of "
                  f"{d['n_blocks']} batches sketched ({b['n_train']} examples, "
                  f"{safe(b['sparsification'])} / {safe(b['projection'])}); re-run the "
                  "build to resume")
        return
    from .render import print_index

    print_index(err, gi.IndexConfig(d["config"]), directory=directory, details=True)


# ------------------------------------------------------------------------------- verify

@app.command()
@errors
def verify(directory: Path = typer.Argument(..., metavar="DIR"),
           repair: bool = typer.Option(False, "--repair", help="Rebuild the preconditioner and "
                                       "FAISS index from the stored sketches; restore "
                                       "config.json/build.json from the store's records."),
           task: Optional[str] = typer.Option(None, "--task", "-t", help="With --repair: the "
                                              "task the index was built from, to recompute "
                                              "sketch blocks damaged on disk."),
           json_mode: bool = typer.Option(False, "--json")):
    """Check counts, sketches, LMDB vs FAISS agreement, config hash, preconditioner."""
    import grass_index as gi

    rep = gi.verify_index(directory, repair=repair, task=task)
    if json_mode:
        _emit_json(rep)
    else:
        for c in rep["checks"]:
            mark = "[green]ok[/]  " if c["ok"] else "[red]FAIL[/]"
            err.print(f"{mark} {c['name']}: {safe(c['detail'])}")
        for r in rep["repaired"]:
            err.print(f"[cyan]repair:[/] {safe(r)}")
        err.print("[green]index is consistent[/]" if rep["ok"] else
                  f"[red]index has problems[/]; try `grass-index verify {shell_arg(directory)} "
                  "--repair`")
    if not rep["ok"]:
        raise typer.Exit(EXIT_ERROR)


# Sub-commands in their own modules: `eval` (LDS), `selective-mask fit`, `serve`,
# `self-influence`, `tune`.
from . import eval_cmd, selective_cmd, self_influence_cmd, serve_cmd, tune_cmd  # noqa: E402

eval_cmd.register(app)
selective_cmd.register(app)
serve_cmd.register(app)
self_influence_cmd.register(app)
tune_cmd.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
