"""`grass-index query` and `score`: rank or score training examples for query examples
(by id in the task's data, or from an input file)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from .errors import err, errors, fail, out, safe
from .render import emit_json
from .task_opts import data_option, hf_model_option, named_task


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


def query(
    directory: Path = typer.Argument(..., metavar="DIR", help="Index directory."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help=_TASK_HELP),
    hf_model: Optional[Path] = hf_model_option(),
    data: Optional[Path] = data_option(),
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
    if png is not None:
        _check_writable_file(png, "--png")  # before the work, not after
    idx, t = _open_with_task(directory, named_task(task, hf_model, data), "query")
    if text:  # -- raw text queries (--hf-model indexes) --
        ids, items, source = _text_items(t, text, directory, example or input_file is not None)
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
        emit_json(dict(index=str(directory), task=t.ref, recorded_task=idx.task, k=top_k, ms_per_example=round(ms, 3),
                        normalize=normalize, results=results))
        return
    _print_tables(results, t.has("label"))
    err.print(f"{ms:.1f} ms per example")


def _text_items(t, text: list[str], directory, other_examples: bool):
    """(ids, examples, source) of ``--text`` queries: the task encodes them."""
    if other_examples:
        fail("pass --text, --example or --input, not several")
    if not t.has("encode"):
        fail(f"the task of index {directory} cannot turn text into examples; --text needs an "
             "index built with --hf-model (or a task with encode(text)); or give --example "
             "/ --input")
    return list(range(len(text))), [t.encode(s) for s in text], "text"


def _print_tables(results: list[dict], labelled: bool) -> None:
    """One table per example and kind (proponents, opponents)."""
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
            if labelled:
                tab.add_column("label")
            for rank, row in enumerate(res[kind], 1):
                cells = [str(rank), str(row["train_id"]), f"{row['score']:+.4g}"]
                if labelled:
                    cells.append(str(row["label"]))
                tab.add_row(*(safe(c) for c in cells))
            out.print(tab)


def _check_writable_file(path: Path, flag: str) -> None:
    """An output file's folder exists and the path is not a folder, checked before the work."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        fail(f"{flag} {path}: the folder {parent} does not exist; create it first or choose "
             "another path")
    if path.is_dir():
        fail(f"{flag} {path} is a folder; give a file name, e.g. {path / 'query.png'}")


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


def score(
    directory: Path = typer.Argument(..., metavar="DIR"),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the .npy matrix."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help=_TASK_HELP),
    hf_model: Optional[Path] = hf_model_option(),
    data: Optional[Path] = data_option(),
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
    idx, t = _open_with_task(directory, named_task(task, hf_model, data), "score")
    _, items, source = _examples(idx, t, None, input_file, split, all_default=True)
    from grass_index.fileio import atomic_save

    model = t.index_model()
    t0 = time.perf_counter()
    s = idx.score(model, items, t.loss, collate=t.collate, normalize=normalize).numpy()
    secs = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, lambda f: np.save(f, s))
    if json_mode:
        emit_json(dict(out=str(out), shape=list(s.shape), source=source, seconds=round(secs, 3)))
    else:
        err.print(safe(f"wrote {out}: scores [{s.shape[0]} {source} x {s.shape[1]} train] "
                          f"in {secs:.1f} s"))


def register(app: typer.Typer) -> None:
    """Add `query`, `score` to the grass-index typer app."""
    app.command("query")(errors(query))
    app.command("score")(errors(score))
