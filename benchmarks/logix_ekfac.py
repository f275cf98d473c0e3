"""Issue 21's EK-FAC goal side by side: grass-index LoGra EK-FAC vs LogIX's EK-FAC on GPT-2
small (random init, nothing downloaded), n sequences x T tokens, batch 8.

    PYTHONPATH=$PWD python3 benchmarks/logix_ekfac.py [--runs 2] [--n 64] [--tokens 64]
        [--queries 16] [--logix-python /work/venvs/logix/bin/python]

LogIX (logix-ai 0.1.1, optional, benchmark only) lives in its own virtual environment; its
only dependencies beyond torch are einops, pyyaml and tqdm:

    python -m venv /work/venvs/logix --system-site-packages
    /work/venvs/logix/bin/pip install einops
    /work/venvs/logix/bin/pip install --no-deps --ignore-requires-python logix-ai==0.1.1

The work matched on each side, ending with the scores of the same queries against every
training example:
  grass-index: ``build_index(sparsification="normal-64*64", projection="identity",
               hessian="ekfac")`` (check, pass 1 with the Kronecker factors, pass 2), then
               ``AttributionIndex.score`` (the queries' sketches + their scores);
  LogIX:       GPT-2's Conv1D converted to nn.Linear (LogIX hooks nn.Linear only), the 48
               layers watched, ``LogIXScheduler(lora="random", hessian="ekfac", save="grad")``
               (pass 1: the Kronecker covariances; pass 2: per-example LoRA gradients logged
               to disk + corrected eigenvalues), then ``compute_influence_all`` of the query
               log against the logged training gradients.
LogIX's LoRA encoder/decoder are set to grass-index's own projections of each layer
(``normal-64*64`` over [x; 1], the bias column as the encoder's bias), so both sides compute
the same 64 x 64 sketch per layer and their scores can be compared number for number: after
the timed phases each side also scores with one shared absolute damping
(0.1 x mean corrected eigenvalue of a reference layer), untimed.

Each side runs in its own child process (peak RSS = that child's VmHWM), which first runs a
training epoch over the same batches (forward + backward with weight gradients), so each
phase is also a ratio to an epoch measured under the same load. Sides alternate
(A B A B ...); the table shows each side's minimum over the runs and the load averages.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _gpt2_task import WORDS, gpt2_task, peak_rss_bytes  # noqa: E402

SPEC = dict(sparsification="normal-64*64", projection="identity", hessian="ekfac")
REF_LAYER = "transformer.h.0.mlp.c_fc"   # its mean corrected eigenvalue sets the shared λ
DEFAULT_LOGIX_PY = "/work/venvs/logix/bin/python"


# ----------------------------------------------------------------------------- shared

def conv1d_to_linear(model):
    """Replace every HF Conv1D (y = x W + b, W [d_in, d_out]) with the equal nn.Linear."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
                lin = torch.nn.Linear(d_in, d_out)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    lin.bias.copy_(child.bias)
                setattr(mod, cname, lin)
    return model


def causal_lm_loss(model, batch):
    """grass_index.tasks.hf_lm.causal_lm_loss, copied so the LogIX child needs no grass-index:
    next-token cross-entropy summed over each sequence's real tokens, Tensor[B]."""
    import torch.nn.functional as F

    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = ids[:, 1:]
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              tgt.reshape(-1), reduction="none").view_as(tgt)
    return (per_tok * mask[:, 1:].to(per_tok.dtype)).sum(dim=1)


def epoch(model, batches, loss_fn) -> tuple[float, float]:
    """(seconds, summed loss) of one training epoch: forward + backward with weight grads."""
    t0, total = time.time(), 0.0
    for b in batches:
        loss = loss_fn(model, b).sum()
        loss.backward()
        total += float(loss)
        model.zero_grad(set_to_none=True)
    return time.time() - t0, total


def _threads():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)


# ----------------------------------------------------------------------------- preparation

def prepare(args) -> dict:
    """Model + corpus + queries on disk, the tokenized batches (for the LogIX child), each
    layer's grass-index projections, and whether grass-index sketches GPT-2's Conv1D and the
    nn.Linear conversion alike."""
    import copy

    import torch

    from grass_index.capture import GradientSketcher, select_layers

    _threads()
    work = Path(args.work)
    task = _task(work, args)
    model, data, queries = task.model(), task.train_data(), task.query_data()
    bs = args.batch_size
    train = [task.collate([data[i] for i in range(lo, min(len(data), lo + bs))])
             for lo in range(0, len(data), bs)]
    query = task.collate([queries[i] for i in range(len(queries))])
    torch.save({"train": train, "query": query}, work / "batches.pt")
    layers = select_layers(model)
    sk = GradientSketcher(model, layers, sparsification=SPEC["sparsification"],
                          projection=SPEC["projection"])
    proj = {layer.name: {"in": sk.compressors[layer.name].compress_in.matrix.clone(),
                         "out": sk.compressors[layer.name].compress_out.matrix.clone()}
            for layer in layers}
    torch.save(proj, work / "proj.pt")
    a = sk.sketch(train[0], task.loss)
    lin = conv1d_to_linear(copy.deepcopy(model))
    lin_layers = select_layers(lin)
    b = GradientSketcher(lin, lin_layers, sparsification=SPEC["sparsification"],
                         projection=SPEC["projection"]).sketch(train[0], task.loss)
    return dict(layers=len(layers), names_equal=[x.name for x in layers] ==
                [x.name for x in lin_layers], K=int(a.shape[1]),
                conv_vs_linear_rel=float((a - b).abs().max() / a.abs().max()),
                queries=len(queries), n=len(data))


def _task(work: Path, args):
    import numpy as np

    task = gpt2_task(work, args.n, args.tokens)
    rng = np.random.default_rng(1)
    (work / "query.txt").write_text(
        "\n".join(" ".join(rng.choice(WORDS, 40)) for _ in range(args.queries)) + "\n")
    os.environ["GRASS_INDEX_QUERY_FILE"] = str(work / "query.txt")
    return task


# ----------------------------------------------------------------------------- grass-index

def gi_child(args) -> dict:
    t_start = time.time()
    import numpy as np
    import torch

    import grass_index as gi

    _threads()
    work = Path(args.work)
    task = _task(work, args)
    model, data, queries = task.model(), task.train_data(), task.query_data()
    start_s = time.time() - t_start
    bs = args.batch_size
    batches = [task.collate([data[i] for i in range(lo, min(len(data), lo + bs))])
               for lo in range(0, len(data), bs)]
    epoch_s, loss_sum = epoch(model, batches, task.loss)
    rss_epoch = peak_rss_bytes()
    marks, t0 = {}, time.time()

    def progress(stage, done, total):
        marks.setdefault(stage, time.time() - t0)
        marks[stage + "_end"] = time.time() - t0

    out = work / f"gi-{args.tag}"
    idx = gi.build_index(model, data, task.loss, out, collate=task.collate, progress=progress,
                         batch_size=bs, **SPEC)
    build_s = time.time() - t0
    t1 = time.time()
    scores = idx.score(model, queries, task.loss, collate=task.collate, batch_size=bs)
    score_s = time.time() - t1
    res = dict(side="grass-index", start_s=start_s, epoch_s=epoch_s, loss_sum=loss_sum,
               rss_epoch_gb=rss_epoch / 1e9, check_s=marks["sketch"],
               pass1_s=marks["sketch_end"] - marks["sketch"],
               pass2_s=build_s - marks["sketch_end"], score_s=score_s,
               peak_rss_gb=peak_rss_bytes() / 1e9, load=os.getloadavg())
    np.save(work / f"scores-{args.tag}.npy", scores.numpy())
    if args.compare:   # untimed: the shared absolute damping, and the first rows' sketches
        lam = 0.1 * float(np.mean(idx.preconditioner.forms[REF_LAYER].eig))
        idx.reprecondition(damping=f"abs:{lam!r}", hessian="ekfac")
        s_abs = idx.score(model, queries, task.loss, collate=task.collate, batch_size=bs)
        np.save(work / f"scores-abs-{args.tag}.npy", s_abs.numpy())
        _, rows = next(idx.raw_sketches())
        torch.save({"layout": dict(idx.config["layout"]), "rows": torch.from_numpy(
            np.asarray(rows[:8]))}, work / f"sketches-{args.tag}.pt")
        res["ref_lambda"] = lam
    idx.close()
    shutil.rmtree(out, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- LogIX

def logix_child(args) -> dict:
    t_start = time.time()
    import torch
    from transformers import GPT2LMHeadModel

    import logix
    from logix.scheduler import LogIXScheduler

    _threads()
    work = Path(args.work)
    model = conv1d_to_linear(GPT2LMHeadModel.from_pretrained(work / "gpt2")).eval()
    saved = torch.load(work / "batches.pt")
    batches, query = saved["train"], saved["query"]
    proj = torch.load(work / "proj.pt")
    start_s = time.time() - t_start
    epoch_s, loss_sum = epoch(model, batches, causal_lm_loss)
    rss_epoch = peak_rss_bytes()
    root = work / f"logix-{args.tag}"
    (work / f"logix-{args.tag}.yaml").write_text(f"root_dir: {root}\n")
    t0 = time.time()
    run = logix.init(project="ekfac", config=str(work / f"logix-{args.tag}.yaml"))
    run.watch(model, name_filter=["c_attn", "c_proj", "c_fc"])
    scheduler = LogIXScheduler(run, lora="random", hessian="ekfac", save="grad")
    passes = []
    for ep in scheduler:
        if ep == 0:
            _set_projections(model, proj)
        for b, (ids, mask) in enumerate(batches):
            data_id = [str(b * args.batch_size + i) for i in range(len(ids))]
            with run(data_id=data_id, mask=mask):
                model.zero_grad()
                causal_lm_loss(model, (ids, mask)).sum().backward()
        run.finalize()
        passes.append(time.time() - t0 - sum(passes))
    # LogIX's precondition_kfac adds the damping to its stored eigenvalues in place, so a
    # second scoring needs them restored (untimed, --compare only)
    eig0 = {k: v.clone() for k, v in run.state.get_covariance_svd_state()[0].items()} \
        if args.compare else None
    t1 = time.time()
    scores = _logix_scores(run, model, query, damping=None)
    score_s = time.time() - t1
    res = dict(side="LogIX", start_s=start_s, epoch_s=epoch_s, loss_sum=loss_sum,
               rss_epoch_gb=rss_epoch / 1e9, check_s=0.0, pass1_s=passes[0],
               pass2_s=passes[1], score_s=score_s, peak_rss_gb=peak_rss_bytes() / 1e9,
               load=os.getloadavg())
    import numpy as np

    np.save(work / f"scores-{args.tag}.npy", scores)
    if args.compare:
        state = run.state.get_covariance_svd_state()[0]
        for k, v in eig0.items():
            state[k].copy_(v)
        lam = 0.1 * float(eig0[REF_LAYER + ".logix_lora_B"].double().mean())
        np.save(work / f"scores-abs-{args.tag}.npy",
                _logix_scores(run, model, query, damping=lam))
        res["ref_lambda"] = lam
        _dump_logix_rows(run, proj, work / f"sketches-{args.tag}.pt")
    shutil.rmtree(root, ignore_errors=True)
    return res


def _set_projections(model, proj) -> None:
    """LogIX's LoRA A (encoder) and C (decoder) of each layer := grass-index's compress_in
    ([d_in + 1, 64]: its last row multiplies the bias column, so it becomes A's bias) and
    compress_out ([d_out, 64]): B's input is then x' = [x; 1] P_in and its output gradient
    g' = Dy P_out, and LogIX's logged gradient of B is grass-index's sketch Σ_t g' x'ᵀ."""
    import torch

    for name, mats in proj.items():
        lora = model.get_submodule(name)
        p_in, p_out = mats["in"], mats["out"]
        enc = torch.nn.Linear(p_in.shape[0] - 1, p_in.shape[1], bias=True)
        with torch.no_grad():
            enc.weight.copy_(p_in[:-1].T)
            enc.bias.copy_(p_in[-1])
            lora.logix_lora_C.weight.copy_(p_out)
        enc.weight.requires_grad_(False)
        enc.bias.requires_grad_(False)
        lora.logix_lora_A = enc


def _logix_scores(run, model, query, damping):
    """LogIX's influence of every logged training example on the queries, [Q, n] in id order."""
    import numpy as np

    ids, mask = query
    loader = run.build_log_dataloader(batch_size=64)
    run.setup({"grad": ["log"]})
    run.eval()
    with run(data_id=[f"q{i}" for i in range(len(ids))], mask=mask):
        model.zero_grad()
        causal_lm_loss(model, (ids, mask)).sum().backward()
    result = run.compute_influence_all(run.get_log(), loader, damping=damping)
    order = np.argsort([int(t) for t in result["tgt_ids"]])
    return result["influence"].numpy()[:, order]


def _dump_logix_rows(run, proj, path) -> None:
    """The first 8 training examples' logged 64 x 64 gradients per layer."""
    import torch

    ds = run.build_log_dataset()
    rows = {}
    for i in range(8):
        did, log = ds[ds.data_id_list.index(str(i))]
        for name in proj:
            rows.setdefault(name, []).append(torch.as_tensor(
                _dig(log, name + ".logix_lora_B")["grad"]).reshape(-1))
    torch.save({n: torch.stack(v) for n, v in rows.items()}, path)


def _dig(log: dict, name: str):
    """A module's entry in a LogIX log (flat by module name, or nested by its path)."""
    if name in log:
        return log[name]
    node = log
    for part in name.split("."):
        node = node[part]
    return node


# ----------------------------------------------------------------------------- parent

def _child(python: str, kind: str, args, tag: str = "", compare: bool = False) -> dict:
    cmd = [python, __file__, "--child", kind, "--work", args.work, "--n", str(args.n),
           "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
           "--queries", str(args.queries), "--tag", tag] + ["--compare"] * compare
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        sys.exit(f"{kind} child failed:\n{p.stdout[-2000:]}\n{p.stderr[-6000:]}")
    return json.loads(line[0][7:])


def _end_to_end(r: dict) -> float:
    return r["check_s"] + r["pass1_s"] + r["pass2_s"] + r["score_s"]


def _row(r: dict) -> list:
    e2e = _end_to_end(r)
    return [r["side"], f"{r['start_s']:.1f}", f"{r['epoch_s']:.1f}", f"{r['check_s']:.1f}",
            f"{r['pass1_s']:.1f}", f"{r['pass2_s']:.1f}", f"{r['score_s']:.1f}", f"{e2e:.1f}",
            f"{e2e / r['epoch_s']:.2f}", f"{r['peak_rss_gb']:.2f}", f"{r['rss_epoch_gb']:.2f}",
            " ".join(f"{x:.1f}" for x in r["load"])]


HEADER = ["side", "start s", "epoch s", "check s", "pass 1 s", "pass 2 s", "score s",
          "passes + score s", "x epoch", "peak RSS GB", "RSS after epoch GB", "load 1/5/15"]


def _agreement(work: Path, tags: dict) -> dict:
    """How far the two sides' sketches and scores are apart (first run of each)."""
    import numpy as np
    import torch
    from scipy.stats import pearsonr, spearmanr

    g, x = tags["grass-index"], tags["LogIX"]
    out = {}
    for kind in ("", "abs-"):
        a, b = np.load(work / f"scores-{kind}{g}.npy"), np.load(work / f"scores-{kind}{x}.npy")
        rho = [spearmanr(a[q], b[q]).statistic for q in range(len(a))]
        out[kind or "default"] = dict(
            spearman_min=float(min(rho)), spearman_mean=float(np.mean(rho)),
            pearson=float(pearsonr(a.ravel(), b.ravel()).statistic),
            max_rel=float(np.abs(a - b).max() / np.abs(a).max()))
    gs, ls = torch.load(work / f"sketches-{g}.pt"), torch.load(work / f"sketches-{x}.pt")
    start, worst = 0, 0.0
    for name, k in gs["layout"].items():
        a = gs["rows"][:, start:start + k].double()
        start += k
        b = ls[name].double()
        worst = max(worst, float((a - b).abs().max() / a.abs().max()))
    out["sketch_max_rel"] = worst
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--logix-python", default=DEFAULT_LOGIX_PY)
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", choices=["prep", "gi", "logix"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    if args.child:
        fn = {"prep": prepare, "gi": gi_child, "logix": logix_child}[args.child]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return
    if not Path(args.logix_python).exists():
        sys.exit(f"no LogIX interpreter at {args.logix_python}: install logix-ai in a virtual "
                 "environment (see this file's docstring) and pass --logix-python")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        args.work = tmp
        _compare(args)


def _compare(args) -> None:
    from _table import markdown_table

    prep = _child(sys.executable, "prep", args)
    print(f"GPT-2 small, {prep['layers']} layers, K = {prep['K']:,}, n = {prep['n']} x "
          f"T = {args.tokens}, batch {args.batch_size}, {prep['queries']} queries; grass-index "
          f"on Conv1D vs on nn.Linear: same layers {prep['names_equal']}, sketches differ by "
          f"{prep['conv_vs_linear_rel']:.1e} of the largest", flush=True)
    sides = {"grass-index": (sys.executable, "gi"), "LogIX": (args.logix_python, "logix")}
    runs, first = [], {}
    for r in range(args.runs):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            tag = f"{sides[side][1]}{r}"
            res = _child(*sides[side], args, tag=tag, compare=side not in first)
            first.setdefault(side, tag)
            runs.append(res)
            print(markdown_table(HEADER, [_row(res)]).splitlines()[-1], flush=True)
    print("\nall runs, in order:\n" + markdown_table(HEADER, [_row(r) for r in runs]))
    best = {s: min((r for r in runs if r["side"] == s), key=_end_to_end) for s in sides}
    rel = {s: min(_end_to_end(r) / r["epoch_s"] for r in runs if r["side"] == s) for s in sides}
    rss = {s: min(r["peak_rss_gb"] for r in runs if r["side"] == s) for s in sides}
    rows = [_row(dict(best[s], peak_rss_gb=rss[s])) for s in sides]
    print("\nminimum of each side (fastest run; lowest peak RSS):\n" +
          markdown_table(HEADER, rows))
    g, x = best["grass-index"], best["LogIX"]
    print(f"grass-index / LogIX: passes + score {_end_to_end(g) / _end_to_end(x):.2f}x "
          f"(min over runs of each one's x epoch: {rel['grass-index']:.2f} vs "
          f"{rel['LogIX']:.2f} = {rel['grass-index'] / rel['LogIX']:.2f}x), peak RSS "
          f"{rss['grass-index'] / rss['LogIX']:.2f}x; epoch loss sums "
          f"{g['loss_sum']:.4f} vs {x['loss_sum']:.4f}")
    agree = _agreement(Path(args.work), first)
    lam = [r.get("ref_lambda") for r in runs if "ref_lambda" in r]
    print(f"agreement (shared projections; λ of {REF_LAYER}: {lam}): " + json.dumps(agree))


if __name__ == "__main__":
    main()
