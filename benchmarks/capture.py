"""Capture cost against training: one process, the same batches, three ways each.

    python benchmarks/capture.py              # GPT-2-style small, GPT-2 small, ResNet-9 CNN
    python benchmarks/capture.py --only gpt2s # pick workloads: small, gpt2s, resnet
    python benchmarks/capture.py --quick      # fewer batches, smoke run
    python benchmarks/capture.py --only check # the first-batch check's cost, GPT-2 small

Per workload: a plain training epoch (forward + backward with weight gradients, no optimizer
step), forward only (no_grad), and pass 1 of a build (GradientSketcher.sketch over the same
batches, after its one-time first-batch check, which is timed separately). The ratio column is
training time / time of that row, so pass 1 ≥ 1.0× means it is at least as fast as training.
Models are random init (nothing downloaded); threads are fixed so runs compare.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from _table import markdown_table  # benchmarks/ is on sys.path when run as a script


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return tok.mean(1)


def gpt2(small: bool):
    import transformers as tr

    cfg = (tr.GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=64, vocab_size=8192)
           if small else tr.GPT2Config())
    cfg._attn_implementation = "eager"
    return tr.GPT2LMHeadModel(cfg).eval(), cfg.vocab_size


def conv_bn(cin, cout, pool=False):
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, *( [nn.MaxPool2d(2)] if pool else []))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        return x + self.b(self.a(x))


def resnet9(width=64, classes=10):
    """The CIFAR ResNet-9 shape (Myrtle): prep, 3 stages with 2 residual blocks, pool, Linear."""
    w = width
    return nn.Sequential(conv_bn(3, w), conv_bn(w, 2 * w, pool=True), Residual(2 * w),
                         conv_bn(2 * w, 4 * w, pool=True), conv_bn(4 * w, 8 * w, pool=True),
                         Residual(8 * w), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(8 * w, classes)).eval()


def cls_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def time_interleaved(fns, batches, repeat=1):
    """Seconds per fn over all batches; the fns take turns on each batch (so load from other
    processes hits all of them alike) and each (fn, batch) keeps its best of ``repeat``."""
    best = [[float("inf")] * len(batches) for _ in fns]
    for _ in range(repeat):
        for j, b in enumerate(batches):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(b)
                best[i][j] = min(best[i][j], time.perf_counter() - t0)
    return [sum(row) for row in best]


def run(name, model, batches, loss_fn, sparsification, projection, repeat):
    from grass_index.capture import GradientSketcher, select_layers

    layers = select_layers(model)
    sk = GradientSketcher(model, layers, sparsification=sparsification, projection=projection)

    def train(b):
        loss_fn(model, b).mean().backward()
        model.zero_grad(set_to_none=True)

    def forward(b):
        with torch.no_grad():
            loss_fn(model, b)

    train(batches[0])  # warm up allocators and lazy inits, all three paths
    forward(batches[0])
    t0 = time.perf_counter()
    sk.check(batches[0], loss_fn)
    t_check = time.perf_counter() - t0
    sk.sketch(batches[0], loss_fn)
    routes = sorted(set(sk.route.values()))
    t_train, t_fwd, t_pass1 = time_interleaved(
        [train, forward, lambda b: sk.sketch(b, loss_fn)], batches, repeat)
    n = sum(len(b[0]) if isinstance(b, tuple) else len(b) for b in batches)
    print(f"{name}: {len(layers)} layers, K={sk.dim}, routes {routes}, first-batch check "
          f"{t_check:.2f} s", flush=True)
    return [(name, what, f"{t:.2f}", f"{n / t:.1f}", f"{t_train / t:.2f}x")
            for what, t in (("training epoch (fwd+bwd, dW)", t_train), ("forward only", t_fwd),
                            (f"pass 1 ({sparsification} -> {projection})", t_pass1))]


def check_cost(repeat: int):
    """The first-batch capture check on GPT-2 small (T=64, the default batch size 32 and
    specs), on the whole batch (how it ran before) and on its first CHECK_EXAMPLES examples
    (now), against one pass-1 batch; each timed on a fresh sketcher, interleaved, best of
    ``repeat``."""
    from grass_index.capture import GradientSketcher, select_layers
    from grass_index.capture import sketcher as sketcher_mod

    model, V = gpt2(False)
    batch = torch.randint(0, V, (32, 64), generator=torch.Generator().manual_seed(0))
    layers = select_layers(model)
    specs = dict(sparsification="random_mask-128*128", projection="sjlt-4096")
    now = sketcher_mod.CHECK_EXAMPLES
    # wall seconds and this process's CPU seconds (less sensitive to other jobs' load)
    best = {key: [float("inf"), float("inf")] for key in ("whole", "now", "batch")}

    def timed(key, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        best[key] = [min(best[key][0], w), min(best[key][1], c)]

    checked = None
    for _ in range(repeat):
        for what, m in (("whole", 32), ("now", now)):
            sk = GradientSketcher(model, layers, **specs)
            sketcher_mod.CHECK_EXAMPLES = m
            try:
                timed(what, lambda: sk.check(batch, lm_loss))
            finally:
                sketcher_mod.CHECK_EXAMPLES = now
            checked = sk
        timed("batch", lambda: checked.sketch(batch, lm_loss))
    print(f"GPT-2 small check: {len(layers)} layers, routes {sorted(set(checked.route.values()))}",
          flush=True)
    name = "GPT-2 small, T=64, B=32"
    wall, cpu = best["batch"]
    return [(name, what, f"{best[key][0]:.2f}", f"{best[key][1]:.2f}",
             f"{best[key][0] / wall:.2f} / {best[key][1] / cpu:.2f}")
            for what, key in (("check on the whole first batch (before)", "whole"),
                              (f"check on {now} examples (now)", "now"),
                              ("one pass-1 batch", "batch"))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="small,gpt2s,resnet")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    only = set(args.only.split(","))
    rows = []
    g = torch.Generator().manual_seed(0)
    repeat = 1 if args.quick else 2
    if "small" in only:
        model, V = gpt2(True)
        batches = [torch.randint(0, V, (8, 64), generator=g) for _ in range(2 if args.quick else 4)]
        rows += run("GPT-2-style 4x256, T=64, B=8", model, batches, lm_loss,
                    "random_mask-32*32", "sjlt-256", repeat)
    if "gpt2s" in only:
        model, V = gpt2(False)
        batches = [torch.randint(0, V, (8, 64), generator=g) for _ in range(2 if args.quick else 3)]
        rows += run("GPT-2 small, T=64, B=8", model, batches, lm_loss,
                    "random_mask-64*64", "sjlt-4096", 1)
        del model
    if "check" in only:
        check_rows = check_cost(1 if args.quick else 2)
        print()
        print(markdown_table(["workload", "what", "wall s", "CPU s",
                              "batches (wall / CPU)"], check_rows))
    if "resnet" in only:
        model = resnet9()
        batches = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
                   for _ in range(2 if args.quick else 4)]
        rows += run("ResNet-9, 32x32, B=32", model, batches, cls_loss,
                    "random_mask-32*32", "sjlt-256", repeat)
    if rows:
        print()
        print(markdown_table(["workload", "what", "seconds", "examples/s", "speed vs training"],
                             rows))


if __name__ == "__main__":
    main()
