"""What the CLI prints for an index, one renderer for `build`, `merge` and `info`: a summary
line, the layer table (one short phrase per compression stage) and the index line."""
from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from .. import IndexConfig, parse_spec
from ..task import task_file_status
from .errors import err, out, safe, shell_arg


def _spec(text):
    try:
        return parse_spec(text)
    except Exception:
        return None


def _stage(name: str, want, got, size) -> str:
    """e.g. 'in: exact (65 ≤ 128)' when a stage was clamped to identity, else what runs, e.g.
    'in: random_mask-128'."""
    if want is None:
        return f"{name}: {got}"
    if got == "identity" or str(got).startswith("identity"):
        if want == "identity" or str(want).startswith("identity"):
            return f"{name}: exact"
        return f"{name}: exact ({size} ≤ {want.split('-')[-1]})" if size else f"{name}: exact"
    return f"{name}: {want}"


def layer_stages(desc: dict, dims: dict) -> str:
    """One short phrase per stage of one layer's compressor (from its describe() record):
    what runs, and where a stage was clamped to exact because the layer is smaller than the
    spec, the two sizes."""
    req = desc.get("requested") or {}
    rs, gs = _spec(req.get("sparsification", "")), _spec(desc.get("sparsification", ""))
    rp, gp = req.get("projection"), desc.get("projection")
    parts = []
    if rs is not None and gs is not None:
        if rs.factored:
            gdims = gs.dims if gs.factored else (None, None)
            for label, i, kind in (("in", 0, rs.kind), ("out", 1, rs.kind)):
                want = f"{kind}-{rs.dims[i]}"
                got = f"{gs.kind}-{gdims[i]}" if gdims[i] is not None else str(gs)
                parts.append(_stage(label, want, got, gdims[i]))
        else:
            size = gs.dims[0] if gs.dims else None
            parts.append(_stage("mask", str(rs), str(gs), size))
    elif desc.get("sparsification"):
        parts.append(f"mask: {desc['sparsification']}")
    if rp is not None or gp is not None:
        rpp = _spec(rp or "")
        want = f"{rpp.kind}-{rpp.dims[0]}" if rpp is not None and rpp.dims else rp
        parts.append(_stage("proj", want, gp, desc.get("k")))
    parts.extend(str(n) for n in desc.get("notes") or [])  # capture routes the build chose
    return ", ".join(parts)


def tuned_rows(cfg: dict) -> list:
    """`tune`'s record: the chosen preconditioner and its LDS (absent for untuned indexes)."""
    t = cfg.get("tune")
    if not t:
        return []
    c = t["choice"]

    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    return [("tuned", f"{c['name']} (LDS validation {f(c['val_lds'])}, held-out "
                      f"{f(c['heldout_lds'])}; {len(t['grid'])} candidates, {t['n_subsets']} "
                      "subsets)")]


def capture_rows(cfg: dict, shown: int = 6) -> list:
    """What the build's capture left out or changed (config.json ``capture``): parameters the
    layer selection left out (the first few, with why), layers the first-batch check moved
    to torch.func, and layers dropped for a zero gradient on every training example."""
    cap = cfg.get("capture") or {}
    rows = []
    left = cap.get("left_out") or {}
    if left:
        items = [f"{k} ({v})" for k, v in list(left.items())[:shown]]
        more = f"; and {len(left) - shown} more (info --json)" if len(left) > shown else ""
        rows.append(("not attributed", f"{len(left)} trainable parameters: "
                     + "; ".join(items) + more))
    for name, note in (cap.get("moved_to_flat") or {}).items():
        rows.append(("moved to flat", f"{name}: {note}"))
    zero = cap.get("zero_gradient") or []
    if zero:
        rows.append(("dropped", f"{', '.join(zero)}: zero gradient for every training example "
                     "(not in the preconditioner; adds nothing to any score)"))
    return rows


def index_summary(cfg: IndexConfig) -> str:
    """e.g. 'ivf:fp16, 200000 vectors, nlist 1788 nprobe 224, recall@10 0.981 (100 queries)'."""
    ix = cfg.index
    parts = [str(cfg.index_kind), f"{ix.get('ntotal')} vectors"
             + (f" in {ix['parts']} files" if ix.get("parts") else "")
             + (" scanned exactly from the sketch store (no FAISS copy)"
                if cfg.held_in_store else "")]
    if ix.get("nlist"):
        parts.append(f"nlist {ix['nlist']} nprobe {ix.get('nprobe')}")
    rec = cfg.recall
    if rec:
        parts.append(f"recall@{rec['k']} {rec['recall']:.3f} vs exact ({rec['queries']} queries)")
    search = (rec or {}).get("search") or {}
    if search.get("width"):  # two-stage search: say whether its recall target was met
        parts.append(f"search sketch {search['width']} × rerank {search['rerank']}: "
                     + ("target " if search.get("target_met") else "BELOW the target ")
                     + f"{search['target_recall']} ({search['reason']})")
    return ", ".join(parts)


def checkpoint_rows(cfg: IndexConfig) -> list[tuple[str, str]]:
    """An ensemble's `info` row: how many checkpoints its scores average over."""
    if cfg.checkpoints == 1:
        return []
    return [("checkpoints", f"{cfg.checkpoints} (scores are the mean over checkpoints; "
                            f"sketch dim {cfg.dim // cfg.checkpoints} each)")]


def layer_table(cfg: IndexConfig) -> Table:
    tab = Table(title="layers", show_lines=False)
    for col in ("layer", "kind", "d_in", "d_out", "numel", "k", "compression",
                "λ in spectrum"):
        tab.add_column(col)
    described, layout = cfg.layers_described, cfg.layout
    placed = (cfg.raw.get("preconditioner") or {}).get("placement") or {}
    for d in cfg.layer_dims:
        # an ensemble: every checkpoint's block of a layer has the same k (shown once, per
        # checkpoint), its description is checkpoint 0's
        key = d["name"] if cfg.checkpoints == 1 else f"c0/{d['name']}"
        desc = described.get(key, {})
        cells = (d["name"], d["kind"], d["d_in"] if d["d_in"] is not None else "-",
                 d["d_out"] if d["d_out"] is not None else "-", d["numel"], layout[key],
                 layer_stages(desc, d).replace(", ", "\n"),  # a stage per line
                 damping_cell(placed.get(key)))
        tab.add_row(*(safe(c) for c in cells))
    return tab


def damping_cell(p: dict | None) -> str:
    """Where a layer's λ sits in its spectrum (precondition.damping.placement): d_eff/k near 1
    is almost no damping, near 0 almost identity; λ over the top and median eigenvalues."""
    if not p or p.get("d_eff/k") is None:
        return "-"
    med = p.get("lambda/median")
    return (f"d_eff/k {p['d_eff/k']:.3g}\nλ/top {p['lambda/top']:.3g}"
            + (f"\nλ/median {med:.3g}" if med is not None else ""))


def generation_rows(cfg: IndexConfig) -> list:
    """A living index's generation (none for a plain build): rows each added, ids removed."""
    gen = cfg.generation
    if gen.number == 0 and not gen.removed:
        return []
    removed = ", ".join(map(str, gen.removed[:20])) + (", ..." if len(gen.removed) > 20 else "")
    return [("generation", f"{gen.number} (rows added per generation: "
                           f"{', '.join(map(str, gen.added))})"),
            ("removed", f"{len(gen.removed)} ids ({removed or 'none'}); "
                        f"{gen.n_live} of {gen.n_train} examples count")]


def print_index(cfg: IndexConfig, *, directory, verb: str | None = None,
                secs: float | None = None, details: bool = False) -> None:
    """`build`/`merge` (verb + seconds) and `info` (details): the same lines, the same table,
    on stdout; the 'next:' hint on stderr."""
    if verb is not None:
        out.print(f"{verb} [bold]{safe(str(directory))}[/]: {cfg.n_train} training examples, "
                  f"sketch dim {cfg.dim}, {len(cfg.layout) // cfg.checkpoints} layers"
                  f"{f' × {cfg.checkpoints} checkpoints' if cfg.checkpoints > 1 else ''}, "
                  f"{secs:.1f} s", soft_wrap=True)
    if details:
        rows = [("task", cfg.task),  # shown, never run; and whether that file still matches
                ("task file", task_file_status(cfg.task, cfg.task_sha256, directory)),
                ("built with", f"grass-index {cfg.version}, torch {cfg.torch_version}"),
                ("train examples", cfg.n_train), ("sketch dim", cfg.dim),
                ("sparsification", cfg.sparsification), ("projection", cfg.projection),
                ("seed", cfg.seed), *checkpoint_rows(cfg), ("hessian", cfg.hessian),
                ("damping", f"{cfg.damping_setting} -> used "
                            f"{json.dumps(cfg.damping_used)}"),
                ("batch size", cfg.batch_size), *generation_rows(cfg),
                *tuned_rows(cfg.raw), *capture_rows(cfg.raw),
                ("config hash", cfg.config_hash),
                ("created", cfg.created)]
        for k, v in rows:
            out.print(f"[bold]{k:>15}[/]: {safe(str(v))}")
    out.print(layer_table(cfg))
    out.print(f"index: {safe(index_summary(cfg))}")
    if verb is not None:
        task = f" --task {shell_arg(cfg.task)}" if cfg.task else ""
        err.print(f"next: grass-index query {shell_arg(directory)}{task} --example 0")


def emit_json(obj) -> None:
    """``--json`` output: one document on stdout (everything else goes to stderr)."""
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def report_index(verb: str, directory, cfg: dict, secs: float, json_mode: bool) -> None:
    """What `build` and `merge` print for a finished index: the config as JSON, or a summary."""
    if json_mode:
        emit_json(dict(cfg, seconds=round(secs, 3)))
        return
    print_index(IndexConfig(cfg), directory=directory, verb=verb, secs=secs)


def print_capture_check(rep, out: Console = out) -> None:
    """`build --check`: a row per layer (route, status, note), then one line per layer that
    no route captures exactly, with the --layers glob that excludes it (stdout)."""
    tab = Table(title=f"capture check ({rep.examples} examples of the first batch)")
    for col in ("layer", "kind", "route", "status", "note"):
        tab.add_column(col)
    for r in rep.layers:
        tab.add_row(*(safe(r[c]) for c in ("layer", "kind", "route", "status", "note")))
    out.print(tab)
    if rep.left_out:
        out.print(f"not attributed ({len(rep.left_out)} trainable parameters): "
                  + safe("; ".join(f"{k}: {v}" for k, v in rep.left_out.items())))
    for r in rep.failed:
        out.print(f"[bold red]failed:[/] layer {safe(r['layer'])} cannot be captured exactly; "
                  f"exclude it with {safe(r['exclude'])}")
    if rep.ok:
        out.print("every selected layer is captured exactly")
