"""EK-FAC beside eFIM, identity, Kronfluence's EK-FAC and `tune`, by LDS; and what keeping the
Kronecker factors costs pass 1.

    python benchmarks/ekfac.py [--tasks digits,token_tagging] [--cost-only | --lds-only]

Tasks: examples/digits.py (MLP on sklearn digits) and examples/token_tagging.py (token-wise
MLP on generated sequences, loss summed over 8 tokens). Specs with an identity projection, so
pass 1 keeps Kronecker factors: ``identity-1024*1024`` (dims clamp: the exact per-example
gradients) and a LoGra-style ``normal-32*32`` / ``normal-16*16``. Every row is the held-out
LDS averaged over --split-seeds (half the queries choose, the other half report) from the
ground truth `eval`/`tune` cache under --out; "best ... (hindsight)" picks the grid point with
the best mean held-out LDS, which no real user can do. Kronfluence (optional: `pip install
kronfluence`, used only here) fits its EK-FAC on the uncompressed gradients of the same model
with its default true-Fisher sampling and its heuristic damping 0.1 × mean eigenvalue.

Pass-1 cost: the same build (hessian identity, so pass 2 is only FAISS) with the factor
observers on and off, best of --reps, alternating; also on a small random-init GPT-2 (2 blocks,
256 wide, 128 tokens, LoGra-style random_mask-64*64), where the model dominates pass 1.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grass_index as gi  # noqa: E402
from benchmarks._table import markdown_table  # noqa: E402
from grass_index.eval.subsets import make_subsets  # noqa: E402
from grass_index.eval.tune import _lds_of, prepare, split_queries, tune_index  # noqa: E402

TASKS = {
    "digits": dict(path=ROOT / "examples" / "digits.py", subsets=30, seeds=(0,),
                   specs=("identity-1024*1024", "normal-32*32"), batch=128),
    "token_tagging": dict(path=ROOT / "examples" / "token_tagging.py", subsets=30, seeds=(0,),
                          specs=("identity-1024*1024", "normal-16*16"), batch=100),
}


def build(task, d: Path, spec: str, batch: int, hessian="eFIM", layers=None):
    if (d / "config.json").is_file():
        return
    shutil.rmtree(d, ignore_errors=True)
    gi.build_index(task.model(), task.train_data(), task.loss, out=d, task=task.ref,
                   sparsification=spec, projection="identity", hessian=hessian,
                   progress=False, batch_size=batch, layers=layers)


def kronfluence_scores(task, out: Path, empirical: bool = False) -> np.ndarray | None:
    """[n_query, n_train] Kronfluence EK-FAC pairwise scores, or None without kronfluence.
    ``empirical``: factors from the training labels (as grass-index does) instead of labels
    sampled from the model (Kronfluence's default, the true Fisher)."""
    try:
        import torch
        import torch.nn.functional as F
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as e:
        print(f"(kronfluence not importable: {e}; its row is skipped)")
        return None

    class KTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            logits = logits.reshape(-1, logits.shape[-1])
            if sample:  # Kronfluence's default: labels drawn from the model (true Fisher)
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y.reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            logits = model(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   reduction="sum")

    kt = KTask()
    model = prepare_model(task.model(), kt)
    an = Analyzer(analysis_name="kf", model=model, task=kt, cpu=True, output_dir=str(out),
                  disable_tqdm=True)
    an.fit_all_factors("ekfac", dataset=task.train_data(), per_device_batch_size=128,
                       factor_args=FactorArguments(strategy="ekfac",
                                                   use_empirical_fisher=empirical),
                       overwrite_output_dir=True)
    an.compute_pairwise_scores("scores", factors_name="ekfac", query_dataset=task.query_data(),
                               train_dataset=task.train_data(), per_device_query_batch_size=64,
                               per_device_train_batch_size=256,
                               score_args=ScoreArguments(damping_factor=None),
                               overwrite_output_dir=True)
    return an.load_pairwise_scores("scores")["all_modules"].double().numpy()


def lds_table(name: str, cfg: dict, out: Path, split_seeds, with_kf: bool) -> list[list]:
    task = gi.load_task(cfg["path"])
    gt = out / f"gt-{cfg['path'].stem}-m{cfg['subsets']}"
    rows = []
    kf_scores = None
    for spec in cfg["specs"]:
        d = out / f"{cfg['path'].stem}-{spec.replace('*', 'x')}"
        build(task, d, spec, cfg["batch"])
        t0 = time.perf_counter()
        prep = prepare(gi.open_index(d), task=str(cfg["path"]), num_subsets=cfg["subsets"],
                       seeds=list(cfg["seeds"]),
                       ground_truth=gt, progress=False)
        res = [tune_index(d, split_seed=s, apply=False, prepared=prep, extend=False)
               for s in split_seeds]  # the same grid on every split (compared by position)
        print(f"{name} {spec}: prepare + sweeps {time.perf_counter() - t0:.1f} s", flush=True)
        grid = res[0].grid
        held = [np.mean([r.grid[j].heldout_lds for r in res]) for j in range(len(grid))]

        def at(pred):
            return next(held[j] for j, c in enumerate(grid) if pred(c))

        def best(scopes):
            j = max((j for j, c in enumerate(grid) if c.scope in scopes), key=lambda j: held[j])
            return f"{held[j]:.3f} ({grid[j].factor:g})"
        kf = ["–", "–"]
        if with_kf and spec.startswith("identity"):
            if kf_scores is None:
                t0 = time.perf_counter()
                kf_scores = [kronfluence_scores(task, out / f"kf-{cfg['path'].stem}-{e}", e)
                             for e in (False, True)]
                print(f"{name}: kronfluence EK-FAC (true and empirical Fisher) in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
                # agreement with grass-index's EK-FAC at the same damping (0.1 × mean eig)
                if kf_scores[1] is not None:
                    dd = out / "ekfac-check"
                    shutil.rmtree(dd, ignore_errors=True)
                    shutil.copytree(d, dd)
                    ours = gi.open_index(dd).reprecondition(hessian="ekfac", damping=0.1)
                    mine = ours.score(task.model(), task.query_data(), task.loss).numpy()
                    r = np.corrcoef(mine.ravel(), kf_scores[1].ravel())[0, 1]
                    rel = np.abs(mine - kf_scores[1]).max() / np.abs(mine).max()
                    print(f"{name}: grass-index EK-FAC 0.1 vs Kronfluence EK-FAC (empirical "
                          f"Fisher, 0.1 × mean eig): Pearson r = {r:.6f} over all pairs, max "
                          f"|diff| / max |score| = {rel:.2e}", flush=True)
            n_q = prep.losses.shape[1]
            for i, sc in enumerate(kf_scores):
                if sc is not None:
                    masks = make_subsets(sc.shape[1], cfg["subsets"], 0.5, 0)
                    pred = masks.astype(np.float64) @ sc[:n_q].T
                    held_lds = [_lds_of(pred, prep.losses, split_queries(n_q, 0.5, s)[1])
                                for s in split_seeds]
                    kf[i] = f"{np.mean(held_lds):.3f}"
        tuned = np.mean([r.choice.heldout_lds for r in res])
        ek01 = at(lambda c: c.hessian == "ekfac" and c.factor == 0.1)
        goal = max(held[0], max(held[j] for j, c in enumerate(grid) if c.scope != "identity"))
        rows.append([name, spec, str(prep.index.dim), f"{held[0]:.3f}",
                     f"{at(lambda c: c.scope == 'per-layer' and c.factor == 0.3):.3f}",
                     best(("per-layer", "global")), f"{ek01:.3f}",
                     f"{at(lambda c: c.hessian == 'ekfac' and c.factor == 0.3):.3f}",
                     best(("ekfac",)), *kf, f"**{tuned:.3f}**",
                     "yes" if tuned >= goal - 0.01 else f"no ({tuned - goal:+.3f})",
                     ", ".join(sorted({r.choice.name for r in res}))])
    return rows


class _LMTask:
    """A small random-init GPT-2 (2 blocks, 256 wide) on random token sequences: where pass 1
    is dominated by the model, as in real LM builds."""

    ref = None

    def __init__(self, n=128, T=128):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self._m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=T,
                                             vocab_size=1000)).eval()
        self._data = torch.utils.data.TensorDataset(
            torch.randint(0, 1000, (n, T), generator=torch.Generator().manual_seed(1)))

    def model(self):
        return self._m

    def train_data(self):
        return self._data

    @staticmethod
    def loss(model, batch):
        import torch.nn.functional as F

        (ids,) = batch
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").reshape(len(ids), -1).sum(1)


def cost_table(name: str, cfg: dict, out: Path, reps: int) -> list[list]:
    import grass_index.pipeline.run as run

    task = gi.load_task(cfg["path"]) if "path" in cfg else _LMTask()
    real = run.factor_shapes
    rows = []
    for spec in cfg["specs"]:
        times = {"on": [], "off": []}
        for _ in range(reps):
            for mode in ("off", "on"):
                run.factor_shapes = real if mode == "on" else (lambda s: None)
                d = out / "cost-build"
                shutil.rmtree(d, ignore_errors=True)
                t0 = time.perf_counter()
                build(task, d, spec, cfg["batch"], hessian="identity",
                      layers=cfg.get("layers"))
                times[mode].append(time.perf_counter() - t0)
        run.factor_shapes = real
        on, off = min(times["on"]), min(times["off"])
        rows.append([name, spec, f"{off:.2f}", f"{on:.2f}", f"{on / off:.3f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-ekfac"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--split-seeds", default="0,1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cost-only", action="store_true")
    ap.add_argument("--lds-only", action="store_true")
    ap.add_argument("--no-kronfluence", action="store_true")
    ap.add_argument("--no-lm", action="store_true", help="skip the GPT-2 pass-1 cost row")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split_seeds = [int(s) for s in args.split_seeds.split(",")]
    tasks = {k: v for k, v in TASKS.items() if k in args.tasks.split(",")}
    if not args.lds_only:
        cost = dict(tasks)
        if not args.no_lm:
            cost["GPT-2 2×256, T=128 (8 layers)"] = dict(
                specs=("random_mask-64*64",), batch=16,
                layers="transformer.h.*.attn.*,transformer.h.*.mlp.*")
        rows = [r for name, cfg in cost.items() for r in cost_table(name, cfg, out, args.reps)]
        print("\npass 1 + FAISS (hessian identity), seconds, best of", args.reps, "\n")
        print(markdown_table(["task", "spec", "factors off", "factors on", "ratio"], rows))
    if not args.cost_only:
        rows = [r for name, cfg in tasks.items()
                for r in lds_table(name, cfg, out, split_seeds, not args.no_kronfluence)]
        print(f"\nheld-out LDS, mean over split seeds {split_seeds} (damping factors × mean "
              "eigenvalue in parentheses)\n")
        print(markdown_table(["task", "spec", "K", "identity", "eFIM 0.3 (default)",
                              "best eFIM (hindsight)", "EK-FAC 0.1", "EK-FAC 0.3",
                              "best EK-FAC (hindsight)", "Kronfluence EK-FAC (default)",
                              "Kronfluence EK-FAC (empirical Fisher)", "tuned",
                              "tuned ≥ max − 0.01", "chosen"], rows))


if __name__ == "__main__":
    main()
