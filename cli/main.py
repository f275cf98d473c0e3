"""The `grass-index` command: a thin layer over the Python API (grass_index.attribute/task).

Human output and progress bars go to stderr; ``--json`` writes one document to stdout.
Every failure is one readable line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Training-data attribution: which training examples made the model do this?")
err = Console(stderr=True, highlight=False)
EXIT_ERROR = 1


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details to stderr.")):
    """grass-index: build an attribution index once, then query it in milliseconds."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(msg: str, code: int = EXIT_ERROR):
    err.print(f"[bold red]error:[/] {msg}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _errors(fn):
    """Turn every exception into one readable line + exit code (traceback with GRASS_INDEX_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted; re-run the same command to resume", 130)
        except Exception as e:
            if os.environ.get("GRASS_INDEX_DEBUG"):
                raise
            known = _known_errors()
            if isinstance(e, known):
                _fail(_escape(str(e)))
            if isinstance(e, OSError):
                _fail(_escape(f"{e.strerror or e} ({getattr(e, 'filename', '') or ''})"))
            _fail(_escape(f"internal error {type(e).__name__}: {e} (set GRASS_INDEX_DEBUG=1 for "
                          "a traceback and please report it)"))

    return wrapper


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _known_errors() -> tuple:
    out = [ValueError]
    for mod, name in (("grass_index.store", "StoreError"), ("grass_index.capture", "CaptureError"),
                      ("grass_index.index", "FaissIndexError"),
                      ("grass_index.attribute", "AttributionError"), ("grass_index.task", "TaskError")):
        try:
            out.append(getattr(__import__(mod, fromlist=[name]), name))
        except Exception:  # a stage that fails to import must not hide the real error
            pass
    return tuple(out)


def _progress(json_mode: bool):
    """A (stage, done, total) callback drawing rich bars on stderr; None-op when not a tty."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=err, transient=True,
                   disable=json_mode or not err.is_terminal)
    tasks = {}
    labels = {"sketch": "pass 1: sketching gradients", "merge": "merging shards",
              "fisher": "pass 2: Fisher", "index": "pass 2: preconditioning + FAISS"}

    def cb(stage, done, total):
        if stage == "done":
            return
        if stage not in tasks:
            tasks[stage] = bar.add_task(labels.get(stage, stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, cb


def _emit_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _split_layers(layers: Optional[List[str]]):
    if not layers:
        return None
    out = [p.strip() for item in layers for p in item.split(",") if p.strip()]
    if not out:
        _fail("--layers is empty; pass globs such as --layers '0.*' or --layers 'fc1.*,fc2.*'")
    return out


# ------------------------------------------------------------------------------- build

@app.command()
@_errors
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

    Under torchrun (e.g. torchrun --nproc_per_node=4 -m grass_index.cli.main build TASK --out
    DIR) every rank sketches its share and rank 0 finishes the index."""
    import grass_index as gi
    from grass_index.task import load_task

    if hf_model is not None or data is not None:  # -- language models, no task file --
        if task is not None or hf_model is None or data is None:
            _fail("--hf-model DIR and --data FILE go together, instead of a TASK")
        from grass_index.tasks import hf_lm_task
        t = hf_lm_task(hf_model, data, text_field=text_field, max_length=max_length,
                       dtype=dtype)
        out = out or Path("runs") / Path(hf_model).name
    else:
        t = load_task(task)
    if out is None:
        stem = Path(t.ref.split(":")[0]).stem if task else "digits"
        out = Path("runs") / stem
    model = t.model()
    data = t.train_data()
    bar, cb = _progress(json_mode)
    if not json_mode:  # the plan (RAM/disk) and, after the first batch, the ETA
        logging.getLogger("grass_index.plan").setLevel(logging.INFO)
    t0 = time.perf_counter()
    with bar:
        idx = gi.build_index(model, data, t.loss, out, sparsification=sparsification,
                             projection=projection, hessian=hessian, damping=damping,
                             batch_size=batch_size, seed=seed, layers=_split_layers(layers),
                             collate=t.collate, index=index, task=t.ref, progress=cb,
                             device=device, selective_mask=selective_mask, worker=worker,
                             remove_shards=remove_shards)
    secs = time.perf_counter() - t0
    if worker is not None:  # a shard, not an index
        if json_mode:
            _emit_json(dict(idx, seconds=round(secs, 3)))
            return
        err.print(f"sketched shard {idx['shard']} of [bold]{out}[/]: {idx['batches']} of "
                  f"{idx['n_batches']} batches ({idx['rows']} examples), {secs:.1f} s")
        err.print(f"next, once every worker is done: grass-index merge {out}")
        return
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return
    _report_index("built", out, idx.config, secs, json_mode, layers=True)


@app.command()
@_errors
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
    from grass_index import plan as plan_mod

    if hf_model is not None:
        if data is None:
            _fail("--hf-model DIR needs --data FILE")
        from grass_index.tasks import hf_lm_task
        t = hf_lm_task(hf_model, data, text_field=text_field, max_length=max_length)
    else:
        from grass_index.task import load_task
        t = load_task(task)
    model = t.model()
    train = t.train_data() if n is None or hf_model is not None else None
    count = n or len(train)
    tokens = max_length if hf_model is not None else 1
    if hf_model is not None:
        tokens = max(len(train[i]) for i in range(min(len(train), 256)))
    cols = {p: plan_mod.plan_for(model, count, sparsification=sparsification, projection=p,
                                 layers=_split_layers(layers), batch_size=batch_size,
                                 index=index, tokens=tokens)
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

    tab = Table(title=f"plan: {count:,} examples, --index {index}")
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


def _report_index(verb: str, directory, cfg: dict, secs: float, json_mode: bool,
                  layers: bool = False) -> None:
    """What `build` and `merge` print for a finished index: the config as JSON, or a summary."""
    if json_mode:
        _emit_json(dict(cfg, seconds=round(secs, 3)))
        return
    err.print(f"{verb} [bold]{directory}[/]: {cfg['n_train']} training examples, sketch dim "
              f"{cfg['dim']}, {len(cfg['layout'])} layers, {secs:.1f} s")
    if layers:
        _layer_table(cfg)
    err.print(f"index: {_escape(_index_summary(cfg))}")
    err.print(f"next: grass-index query {directory} --example 0")


def _index_summary(cfg: dict) -> str:
    """e.g. 'ivf:fp16, 200000 vectors, nlist 1788 nprobe 224, recall@10 0.981 (100 queries)'."""
    ix = cfg.get("index") or {}
    parts = [str(cfg.get("index_kind", ix.get("kind"))), f"{ix.get('ntotal')} vectors"
             + (f" in {ix['parts']} files" if ix.get("parts") else "")]
    if ix.get("nlist"):
        parts.append(f"nlist {ix['nlist']} nprobe {ix.get('nprobe')}")
    rec = ix.get("recall")
    if rec:
        parts.append(f"recall@{rec['k']} {rec['recall']:.3f} vs exact ({rec['queries']} queries)")
    return ", ".join(parts)


@app.command()
@_errors
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

    bar, cb = _progress(json_mode)
    t0 = time.perf_counter()
    with bar:
        idx = gi.merge_shards(directory, shards=shards, hessian=hessian, damping=damping,
                              index=index, progress=cb, remove_shards=remove_shards)
    _report_index("merged", directory, idx.config, time.perf_counter() - t0, json_mode)


def _clamp_note(d: dict) -> str:
    """A layer's clamping notes (compressor describe()["clamped"], a list) as one line."""
    return "; ".join(map(str, d.get("clamped") or []))


def _layer_table(cfg: dict) -> None:
    from rich.table import Table

    tab = Table(title="layers", show_lines=False)
    for col in ("layer", "kind", "d_in", "d_out", "numel", "k", "compression / clamp notes"):
        tab.add_column(col)
    described = cfg.get("layers_described", {})
    for d in cfg["layer_dims"]:
        desc = described.get(d["name"], {})
        spec = " ".join(str(desc[k]) for k in ("sparsification", "projection") if desc.get(k))
        note = _clamp_note(desc)
        tab.add_row(d["name"], d["kind"], str(d["d_in"] if d["d_in"] is not None else "-"),
                    str(d["d_out"] if d["d_out"] is not None else "-"), str(d["numel"]),
                    str(cfg["layout"][d["name"]]), " | ".join(x for x in (spec, note) if x))
    err.print(tab)


# ------------------------------------------------------------------------------- query

def _load_input(path: Path):
    """Examples from a file: .pt (torch.save'd list/tensor/dict), .npy, .npz.
    A dict of equal-length arrays becomes tuples (in key order), e.g. npz with x and y."""
    import numpy as np
    import torch

    if not path.is_file():
        _fail(f"--input {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            obj = torch.load(path, weights_only=True)
        elif suffix == ".npy":
            obj = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        else:
            _fail(f"--input {path}: unknown file type {suffix!r}; use .pt, .npy or .npz")
    except typer.Exit:
        raise
    except Exception as e:
        _fail(f"--input {path} is unreadable: {type(e).__name__}: {e}")

    def conv(x):
        if isinstance(x, np.ndarray):
            t = torch.from_numpy(x.copy())
            return t.float() if t.dtype == torch.float64 else t
        if isinstance(x, (list, tuple)):
            return type(x)(conv(v) for v in x)
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    obj = conv(obj)
    if isinstance(obj, dict):
        arrays = list(obj.values())
        lens = {len(a) for a in arrays}
        if len(lens) != 1:
            _fail(f"--input {path}: arrays {list(obj)} have different lengths {sorted(lens)}")
        return [tuple(a[i] for a in arrays) for i in range(lens.pop())]
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            _fail(f"--input {path} holds a scalar; expected a batch of examples")
        return [obj[i] for i in range(obj.shape[0])]
    if isinstance(obj, (list, tuple)):
        return list(obj)
    _fail(f"--input {path} holds {type(obj).__name__}; expected a list of examples, a tensor "
          "or a dict of arrays")


def _examples(idx, t, example: Optional[List[int]], input_file: Optional[Path], split: str,
              all_default: bool):
    """(example numbers, items, source name) for query/score."""
    if input_file is not None:
        if example:
            _fail("pass either --example or --input, not both")
        items = _load_input(input_file)
        return list(range(len(items))), items, str(input_file)
    if split not in ("query", "train"):
        _fail(f"--split {split!r}: use query or train")
    data = t.query_data() if split == "query" else t.train_data()
    ids = list(example) if example else (list(range(len(data))) if all_default else [0])
    for i in ids:
        if not 0 <= i < len(data):
            _fail(f"--example {i} is out of range: the {split} data has {len(data)} examples "
                  f"(0..{len(data) - 1})")
    return ids, [data[i] for i in ids], f"{split}_data"


def _open_with_task(directory: Path):
    import grass_index as gi
    from grass_index.task import load_task

    idx = gi.open_index(directory)
    if not idx.task:
        _fail(f"index {directory} records no task (built from Python); query it with "
              "grass_index.open_index(...).query(model, examples, loss_fn)")
    t = load_task(idx.task)
    return idx, t


@app.command()
@_errors
def query(
    directory: Path = typer.Argument(..., metavar="DIR", help="Index directory."),
    example: Optional[List[int]] = typer.Option(None, "--example", "-e",
                                                help="Example number(s) in the task's query data."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="Examples file (.pt/.npy/.npz)."),
    split: str = typer.Option("query", help="Where --example points: query or train data."),
    top_k: int = typer.Option(10, "--top-k", "-k", min=1),
    opponents: bool = typer.Option(False, "--opponents", help="Also list the most negative."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="IVF indexes: lists to "
                                         "search (more: higher recall, slower); default: the "
                                         "index's, whose recall `info` shows."),
    json_mode: bool = typer.Option(False, "--json"),
    png: Optional[Path] = typer.Option(None, "--png", help="Draw query + proponents/opponents "
                                       "(tasks with image(item))."),
    text: Optional[List[str]] = typer.Option(None, "--text", help="Query text (repeatable; "
                                             "indexes built with --hf-model)."),
):
    """Top-k training examples that most helped (proponents) or hurt (opponents) each example."""
    idx, t = _open_with_task(directory)
    if text:  # -- raw text queries (--hf-model indexes) --
        if example or input_file is not None:
            _fail("pass --text, --example or --input, not several")
        if not t.has("from_text"):
            _fail(f"index {directory} was not built from --hf-model; --text needs a language "
                  "model index (or give --example / --input)")
        ids, items, source = list(range(len(text))), [t._fns["from_text"](s) for s in text], "text"
    else:
        ids, items, source = _examples(idx, t, example, input_file, split, all_default=False)
    model = t.model()
    t0 = time.perf_counter()
    q = idx.query_sketches(model, items, t.loss, collate=t.collate)
    pro = idx.search(q, top_k, nprobe=nprobe)
    opp = idx.search(q, top_k, opponents=True, nprobe=nprobe) if opponents else None
    ms = 1000 * (time.perf_counter() - t0) / max(1, len(items))
    train = None

    def lab(i):
        nonlocal train
        if not t.has("label"):
            return None
        train = train if train is not None else t.train_data()
        return t.label(train[i])

    results = []
    for r, (i, item) in enumerate(zip(ids, items)):
        res = dict(example=i, source=source, label=t.label(item) if t.has("label") else None,
                   proponents=[dict(train_id=j, score=s, label=lab(j)) for j, s in pro[r]])
        if opp is not None:
            res["opponents"] = [dict(train_id=j, score=s, label=lab(j)) for j, s in opp[r]]
        results.append(res)

    if png is not None:
        _draw(png, t, items, results)
    if json_mode:
        _emit_json(dict(index=str(directory), task=idx.task, k=top_k, ms_per_example=round(ms, 3),
                        results=results))
        return
    from rich.table import Table

    for res in results:
        title = f"{res['source']}[{res['example']}]" + (f" ({res['label']})" if res["label"] else "")
        for kind in ("proponents", "opponents"):
            if kind not in res:
                continue
            tab = Table(title=f"{title}: top {kind}")
            tab.add_column("rank")
            tab.add_column("train id")
            tab.add_column("score")
            if t.has("label"):
                tab.add_column("label")
            for rank, row in enumerate(res[kind], 1):
                cells = [str(rank), str(row["train_id"]), f"{row['score']:+.4g}"]
                if t.has("label"):
                    cells.append(str(row["label"]))
                tab.add_row(*cells)
            err.print(tab)
    err.print(f"{ms:.1f} ms per example")


def _draw(path: Path, t, items, results) -> None:
    from .png import BLUE, GREEN, RED, fmt_score, render

    if not t.has("image"):
        err.print(f"[yellow]warning:[/] task {t.ref} defines no image(item); --png skipped")
        return
    train = t.train_data()
    rows = []
    for item, res in zip(items, results):
        rows.append(("Q", [(t.image(item), f"#{res['example']}", BLUE)]))
        rows.append(("P", [(t.image(train[r["train_id"]]), fmt_score(r["score"]), GREEN)
                           for r in res["proponents"]]))
        if res.get("opponents"):
            rows.append(("O", [(t.image(train[r["train_id"]]), fmt_score(r["score"]), RED)
                               for r in res["opponents"]]))
    render(rows, path)
    err.print(f"wrote {path}")


# ------------------------------------------------------------------------------- score

@app.command()
@_errors
def score(
    directory: Path = typer.Argument(..., metavar="DIR"),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the .npy matrix."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="Examples file instead of "
                                              "the task's query data."),
    split: str = typer.Option("query", help="query or train data (without --input)."),
    json_mode: bool = typer.Option(False, "--json"),
):
    """All query examples x all training examples, as float32 [n_query, n_train] in a .npy."""
    import numpy as np

    idx, t = _open_with_task(directory)
    _, items, source = _examples(idx, t, None, input_file, split, all_default=True)
    model = t.model()
    bar, _ = _progress(json_mode)
    t0 = time.perf_counter()
    s = idx.score(model, items, t.loss, collate=t.collate).numpy()
    secs = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npy")
    np.save(tmp, s)
    os.replace(tmp, out)
    if json_mode:
        _emit_json(dict(out=str(out), shape=list(s.shape), source=source, seconds=round(secs, 3)))
    else:
        err.print(f"wrote {out}: scores [{s.shape[0]} {source} x {s.shape[1]} train] in {secs:.1f} s")


# ------------------------------------------------------------------------------- info

@app.command()
@_errors
def info(directory: Path = typer.Argument(..., metavar="DIR"),
         json_mode: bool = typer.Option(False, "--json")):
    """Show how an index was built (task, specs, per-layer dims and clamping, damping, counts)."""
    from grass_index.attribute import describe_index

    d = describe_index(directory)
    if json_mode:
        _emit_json(d)
        return
    if not d["complete"]:
        b = d["build"]
        err.print(f"[yellow]build in progress or interrupted[/]: {d['committed_blocks']} of "
                  f"{d['n_blocks']} batches sketched ({b['n_train']} examples, "
                  f"{b['sparsification']} / {b['projection']}); re-run the build to resume")
        return
    cfg = d["config"]
    damp = cfg.get("damping_used")
    rows = [("task", cfg.get("task")), ("built with", f"grass-index {cfg['version']}, torch "
                                                      f"{cfg.get('torch')}"),
            ("train examples", cfg["n_train"]), ("sketch dim", cfg["dim"]),
            ("sparsification", cfg["sparsification"]), ("projection", cfg["projection"]),
            ("seed", cfg["seed"]), ("hessian", cfg["hessian"]),
            ("damping", f"{cfg.get('damping') or 'default'} -> used {json.dumps(damp)}"),
            ("index", _index_summary(cfg)), ("batch size", cfg["batch_size"]),
            ("config hash", cfg["config_hash"]), ("created", cfg.get("created"))]
    for k, v in rows:
        err.print(f"[bold]{k:>15}[/]: {_escape(str(v))}")
    _layer_table(cfg)


# ------------------------------------------------------------------------------- verify

@app.command()
@_errors
def verify(directory: Path = typer.Argument(..., metavar="DIR"),
           repair: bool = typer.Option(False, "--repair", help="Rebuild the preconditioner and "
                                       "FAISS index from the stored sketches."),
           json_mode: bool = typer.Option(False, "--json")):
    """Check counts, sketches, LMDB vs FAISS agreement, config hash, preconditioner."""
    from grass_index.attribute import verify_index

    rep = verify_index(directory, repair=repair)
    if json_mode:
        _emit_json(rep)
    else:
        for c in rep["checks"]:
            mark = "[green]ok[/]  " if c["ok"] else "[red]FAIL[/]"
            err.print(f"{mark} {c['name']}: {_escape(c['detail'])}")
        for r in rep["repaired"]:
            err.print(f"[cyan]repair:[/] {_escape(r)}")
        err.print("[green]index is consistent[/]" if rep["ok"] else
                  f"[red]index has problems[/]; try `grass-index verify {directory} --repair`")
    if not rep["ok"]:
        raise typer.Exit(EXIT_ERROR)


# Sub-commands that live beside their stage: `eval` (LDS) and `selective-mask fit`.
from . import eval_cmd, selective_cmd  # noqa: E402

eval_cmd.register(app)
selective_cmd.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
