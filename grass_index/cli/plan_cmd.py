"""`grass-index plan`: the time, RAM and disk a build would need, for the given projection and
two narrower ones side by side — without building. From a model's config alone when its
weights are not at hand (``--hf-model DIR`` builds it on the meta device), so a Llama-size
model over millions of examples and several torchrun nodes can be priced on a laptop."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import List, Optional

import typer

from .errors import err, fail
from .render import emit_json


def plan(
    task: Optional[str] = typer.Argument(None, help="Task file (.py), module or module:attr."),
    hf_model: Optional[Path] = typer.Option(None, "--hf-model", help="A local HF causal LM "
                                            "directory (its config.json suffices: without "
                                            "weight files it is built on the meta device)."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --hf-model: the corpus "
                                        "(optional with --n: then every example is "
                                        "--max-length tokens)."),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per example "
                                             "(default 128, or the model's context if "
                                             "shorter)."),
    dtype: str = typer.Option("float32", "--dtype", help="With --hf-model: float32, bfloat16 "
                              "or float16 weights."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Examples (default: the task's "
                                    "training set size)."),
    sparsification: str = typer.Option("random_mask-128*128"),
    projection: str = typer.Option("sjlt-4096"),
    hessian: str = typer.Option("eFIM", help="eFIM, ekfac or identity."),
    damping: str = typer.Option("auto", "--damping", help="As for build (default: auto, "
                                "which prices every eigenvalue of each dense layer)."),
    layers: Optional[List[str]] = typer.Option(None, "--layers"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    index: str = typer.Option("flat"),
    nodes: int = typer.Option(1, "--nodes", min=1, help="torchrun nodes sharing pass 1."),
    procs_per_node: int = typer.Option(1, "--procs-per-node", min=1, help="torchrun "
                                       "processes per node (e.g. GPUs)."),
    device_flops: Optional[float] = typer.Option(None, "--device-flops", help="float32 FLOP/s "
                                                 "of one process's device (default: this "
                                                 "machine's measured GEMM rate)."),
    time_batch: bool = typer.Option(False, "--time-batch", help="Time pass 1 on the task's "
                                    "first batch (needs the model's weights and data; runs "
                                    "the capture check) instead of estimating from FLOPs."),
    out: Path = typer.Option(Path("runs"), "--out", help="Where the index would go (free disk "
                             "is checked there)."),
    json_mode: bool = typer.Option(False, "--json"),
):
    """Time, RAM and disk a build would need, for the given projection and two narrower ones
    side by side — without building (no gradients, unless --time-batch)."""
    import grass_index as gi
    from grass_index import plan as plan_mod

    opts = gi.IndexOptions(hessian=hessian, damping=damping)  # canonical, or one error line
    hessian, damping = opts.hessian, opts.damping
    model, train, t, tokens = _model_and_data(task, hf_model, data, text_field, max_length,
                                              dtype, n, time_batch)
    count = n or len(train)
    options = gi.BuildOptions(sparsification=sparsification, projection=projection,
                              layers=layers or None, batch_size=batch_size)
    world = nodes * procs_per_node
    cols = {p: plan_mod.plan_for(model, count, sparsification=options.sparsification,
                                 projection=p, layers=options.layers, batch_size=batch_size,
                                 index=index, tokens=tokens, hessian=hessian, damping=damping)
            for p in plan_mod.variants(projection)}
    cpu, times = _times(model, cols, train, t, options, count=count, world=world,
                        tokens=tokens, batch_size=batch_size, hessian=hessian,
                        device_flops=device_flops, time_batch=time_batch, out=out)
    ram, disk = plan_mod.available_ram(), plan_mod.free_disk(out)
    if json_mode:
        emit_json(dict(n=count, tokens=tokens, hessian=hessian, nodes=nodes,
                       procs_per_node=procs_per_node, available_ram=ram, free_disk=disk,
                       damping=damping, rates=dataclasses.asdict(cpu),
                       meta_device=_on_meta(model),
                       plans={p: dict(ram_peak=c.ram_peak, disk=c.disk, K=c.K,
                                      store=c.store_disk, fisher=c.fisher_disk,
                                      preconditioner=c.precond_disk, index=c.index_disk,
                                      ram_pass1=c.ram_pass1, ram_pass2=c.ram_pass2,
                                      index_width=c.index_width,
                                      forms=dict(dense=c.dense_layers,
                                                 low_rank=c.low_rank_layers,
                                                 ekfac=c.ekfac_layers),
                                      seconds=times[p], per_node=_per_node(c, nodes))
                              for p, c in cols.items()}))
        return
    _print_table(gi, model, cols, times, count, index, hessian, nodes, procs_per_node, ram,
                 disk, out)


def _times(model, cols, train, t, options, *, count, world, tokens, batch_size, hessian,
           device_flops, time_batch, out):
    """(this CPU's measured rates, {projection: seconds per phase and pass-2 stage})."""
    import grass_index.plan as plan_mod

    # LAPACK's rates are measured near the plans' largest dense k (they grow with the order)
    cpu = rates = plan_mod.measure_rates(out=out,
                                         lapack_size=plan_mod.lapack_order(cols.values()))
    if device_flops is not None:  # pass 1 on the device; pass 2 runs on this CPU (numpy)
        rates = dataclasses.replace(rates, f32=device_flops,
                                    basis=f"model FLOPs at --device-flops {device_flops:.3g} × "
                                          f"{plan_mod.PASS1_EFFICIENCY}")
    times = {}
    for p, c in cols.items():
        layout = {x.name: x.k for x in c.layers}
        batch_s = (plan_mod.timed_batch_seconds(model, train, t.loss, t.collate, options, p)
                   if time_batch else None)
        tm = plan_mod.predict_seconds(model, layout, n=math.ceil(count / world), tokens=tokens,
                                      batch_size=batch_size, hessian=hessian, rates=rates,
                                      batch_seconds=batch_s, plan=c)
        # every rank fits the whole preconditioner, then applies it to the rows it holds
        stages = plan_mod.pass2_stages(layout, math.ceil(count / world), hessian, cpu, c)
        stages["fit"] = plan_mod.pass2_stages(layout, count, hessian, cpu, c)["fit"]
        tm["pass2_stages"], tm["pass2"] = stages, sum(stages.values())
        times[p] = tm
    return cpu, times


def _on_meta(model) -> bool:
    from grass_index import plan as plan_mod

    return plan_mod.on_meta_device(model)


def _model_and_data(task, hf_model, data, text_field, max_length, dtype, n, time_batch):
    """(model, training data or None, task or None, tokens per example)."""
    import grass_index as gi
    from grass_index.tasks.hf_lm import meta_causal_lm, has_weights, check_model_dir

    if hf_model is None:
        t = gi.load_task(task)
        train = t.train_data() if n is None or time_batch else None
        return t.index_model(), train, t, 1
    if data is None and n is None:
        fail("--hf-model DIR needs --data FILE or --n N (examples of --max-length tokens)")
    if time_batch and data is None:
        fail("--time-batch needs --data FILE (the batch it times)")
    from grass_index.tasks.hf_lm import check_context

    max_length = check_context(str(check_model_dir(hf_model)), max_length)  # fits the context
    t = train = None
    tokens = max_length
    if data is not None:
        t = gi.hf_lm_task(hf_model, data, text_field=text_field, max_length=max_length,
                          dtype=dtype)
        train = t.train_data()
        tokens = max(len(train[i]) for i in range(min(len(train), 256)))
    if time_batch:
        if not has_weights(hf_model):
            fail(f"--time-batch needs the weights of {hf_model}; without them plan estimates "
                 "from the model's FLOPs (drop --time-batch)")
        return t.index_model(), train, t, tokens
    return meta_causal_lm(hf_model, dtype), train, t, tokens


def _per_node(c, nodes: int) -> dict:
    """What each node holds: its share of the sketch store; every node fits the same
    preconditioner and keeps its FAISS part (torchrun builds, pipeline/parallel/distributed.py)."""
    return dict(store=c.store_disk / nodes, index=c.index_disk / nodes,
                preconditioner=c.precond_disk, disk=c.store_disk / nodes + c.index_disk / nodes
                + c.precond_disk + c.fisher_disk)


def _print_table(gi, model, cols, times, count, index, hessian, nodes, ppn, ram, disk, out):
    from rich.table import Table

    from grass_index import plan as plan_mod

    ens = f", {len(model)} checkpoints" if isinstance(model, gi.Checkpoints) else ""
    where = f", {nodes} nodes × {ppn} processes" if nodes * ppn > 1 else ""
    meta = " (model on the meta device: no weights read)" if _on_meta(model) else ""
    tab = Table(title=f"plan: {count:,} examples{ens}, --hessian {hessian}, --index {index}"
                      f"{where}{meta}")
    tab.add_column("")
    for p in cols:
        tab.add_column(f"--projection {p}", justify="right")
    rows = [c.rows() for c in cols.values()]
    for i, (name, _) in enumerate(rows[0]):
        tab.add_row(name, *[r[i][1] for r in rows])
    for name, key in (("time: check", "check"), ("  pass 1" + (" (per node)" if nodes > 1
                                                               else ""), "pass1"),
                      ("  pass 2", "pass2")):
        tab.add_row(name, *[plan_mod.duration(t[key]) for t in times.values()])
    for stage in next(iter(times.values()))["pass2_stages"]:
        tab.add_row(f"    {stage}", *[plan_mod.duration(t["pass2_stages"][stage])
                                     for t in times.values()])
    tab.add_row("  total", *[plan_mod.duration(t["check"] + t["pass1"] + t["pass2"])
                             for t in times.values()])
    if nodes > 1:
        tab.add_row("disk per node", *[f"{_per_node(c, nodes)['disk'] / 1e9:,.1f} GB"
                                       for c in cols.values()])
    fits = ["yes" if plan_mod.shortfall(c, ram=ram, disk=disk, K_per_layer=1) is None else "no"
            for c in cols.values()]
    tab.add_row("fits here", *fits)
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print(tab)  # the result: stdout
    err.print(f"time from {next(iter(times.values()))['basis']}; available now: RAM "
              f"{ram / 1e9 if ram else float('nan'):.1f} GB, disk at {out} {disk / 1e9:.1f} GB")
