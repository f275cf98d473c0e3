"""`grass-index add` and `remove`: change a finished index's training set without a rebuild
(a living index: each change is a new generation, committed atomically; README "A living
index")."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .errors import err, errors, fail, out as stdout, safe, shell_arg
from .render import emit_json


def add(
    directory: Path = typer.Argument(..., metavar="DIR", help="The index to grow."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="The task whose training "
                                       "data grew at the end (the index's examples first, "
                                       "unchanged)."),
    hf_model: Optional[Path] = typer.Option(None, "--hf-model", help="For an index built "
                                            "with --hf-model: the same model directory."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --hf-model: the grown "
                                        "data file (the indexed examples first)."),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    max_length: Optional[int] = typer.Option(None, "--max-length"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="With --hf-model: as the index "
                                        "was built (the default: what it records)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train a new IVF quantizer instead "
                                 "of keeping the index's."),
    device: Optional[str] = typer.Option(None, help="torch device for gradients, e.g. cuda."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0),
    worker: Optional[str] = typer.Option(
        None, "--worker", help="I/N: sketch only worker I's share of the new examples (I = "
        "0..N-1) into DIR/adds/; then `grass-index merge DIR` commits them."),
    json_mode: bool = typer.Option(False, "--json", help="Print the new config as JSON."),
):
    """Sketch only the examples the training data gained at the end and make them part of the
    index (a new generation: the Fisher gains them, the preconditioner is refitted).

    Split over workers: `add DIR --task T --worker I/N` for I = 0..N-1, then `merge DIR`.
    Under torchrun every rank sketches its share and rank 0 commits and reports."""
    import grass_index as gi
    from .build_cmd import _build_task

    if task is None and hf_model is None:
        fail("name the task whose data grew: --task FILE, or --hf-model DIR --data FILE")
    if hf_model is not None:  # the new text is tokenized as the build tokenized the old
        text_field, max_length, dtype = _as_recorded(directory, text_field=text_field,
                                                     max_length=max_length, dtype=dtype)
    t, _ = _build_task(task, directory, hf_model=hf_model, data=data, text_field=text_field,
                       max_length=max_length, dtype=dtype or "float32")
    t0 = time.perf_counter()
    kw = dict(collate=t.collate, device=device, retrain=retrain, workers=workers, task=t.ref)
    if worker is not None:
        info = gi.add_shard(directory, t.index_model(), t.train_data(), t.loss, worker, **kw)
        _report_shard(directory, info, time.perf_counter() - t0, json_mode)
        return
    idx = gi.add_examples(directory, t.index_model(), t.train_data(), t.loss, **kw)
    if idx.reporting:  # torchrun: rank 0 reports
        _report("grew", directory, idx, time.perf_counter() - t0, json_mode)


def _as_recorded(directory: Path, **given):
    """(text field, max length, dtype) for an add to an --hf-model index: each option the
    user left out is the one the index records; one given otherwise is refused (the indexed
    examples would be tokenized differently, and every one would differ)."""
    import grass_index as gi
    from grass_index.tasks.hf_lm import REF_PREFIX, ref_args

    try:
        ref = gi.open_index(directory).task
    except gi.GrassIndexError:
        ref = None  # not an index, or damaged: add_examples says so
    recorded = ref_args(ref) if isinstance(ref, str) and ref.startswith(REF_PREFIX) else {}
    out = []
    for key, flag in (("text_field", "--text-field"), ("max_length", "--max-length"),
                      ("dtype", "--dtype")):
        want = recorded.get(key)
        if given[key] is not None and want is not None and given[key] != want:
            fail(f"index {directory} was built with {flag} {want}; an add sketches the new "
                 f"text the same way: leave {flag} out, or give {want}")
        out.append(given[key] if given[key] is not None else want)
    return tuple(out)


def _report_shard(directory: Path, info, secs: float, json_mode: bool) -> None:
    if json_mode:
        emit_json(dict(info.to_dict(), seconds=round(secs, 3)))
        return
    stdout.print(f"sketched add shard {info.shard} of [bold]{safe(directory)}[/]: "
                 f"{info.batches} of {info.n_batches} new batches ({info.rows} examples), "
                 f"{secs:.1f} s")
    err.print(f"next, once every worker is done: grass-index merge {shell_arg(directory)}")


def remove(
    directory: Path = typer.Argument(..., metavar="DIR", help="The index to remove from."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Training ids, comma-separated "
                                      "(e.g. 3,17,42)."),
    ids_file: Optional[Path] = typer.Option(None, "--ids-file", help="A file of training ids "
                                            "(commas, spaces or newlines; # comments)."),
    json_mode: bool = typer.Option(False, "--json", help="Print the new config as JSON."),
):
    """Remove training examples: never returned again by query, score, self-influence or
    serve, and out of the Fisher (a new generation; ids never shift)."""
    import grass_index as gi

    if (ids is None) == (ids_file is None):
        fail("give the ids to remove: --ids 3,17,42 or --ids-file FILE (one of them)")
    if ids_file is not None:
        try:
            text = ids_file.read_text()
        except OSError as e:
            fail(f"--ids-file {ids_file}: {e.strerror or e}")
    else:
        text = ids
    t0 = time.perf_counter()
    idx = gi.remove_examples(directory, parse_ids(text))
    _report("removed from", directory, idx, time.perf_counter() - t0, json_mode)


def parse_ids(text: str) -> list[int]:
    """Training ids from "3,17,42" or a file's text (commas, spaces or newlines; # comments)."""
    ids = []
    for line in str(text).splitlines():
        for tok in line.split("#", 1)[0].replace(",", " ").split():
            try:
                ids.append(int(tok))
            except ValueError:
                fail(f"{tok!r} is not a training id (an integer); give ids such as 3,17,42")
    return ids


def _report(verb: str, directory: Path, idx, secs: float, json_mode: bool) -> None:
    if json_mode:
        emit_json(dict(idx.config, seconds=round(secs, 3)))
        return
    gen = idx.settings.generation
    stdout.print(f"{verb} [bold]{safe(directory)}[/]: generation {gen.number}, "
                 f"{gen.n_live} training examples count ({gen.n_train} ids, "
                 f"{len(gen.removed)} removed), {secs:.1f} s")


def register(app: typer.Typer) -> None:
    """Add `add`, `remove` to the grass-index typer app."""
    app.command("add")(errors(add))
    app.command("remove")(errors(remove))
