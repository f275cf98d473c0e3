"""What the capture's forward + backward costs with its TorchFunctionMode on, against a plain
one: "plain" is training's (autograd to every parameter: weight gradients formed), "recorded"
the sketcher's (the forward under the Recorder mode, backward only to the recorded outputs: no
weight gradient). One process, interleaved, min over repeats.

    python benchmarks/capture_mode.py          # MLP (digits size), MHA encoder, GPT-2-style
    python benchmarks/capture_mode.py --quick

The mode runs a Python function per torch call of the forward, so it costs per call, not per
FLOP: on a tiny MLP it outweighs the weight gradients the recorded backward skips; on
transformer blocks the skipped weight gradients dominate. CPU time of this process (one
thread) is reported, as wall time is unreliable on a shared machine.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from _table import markdown_table  # benchmarks/ is on sys.path when run as a script

from grass_index.capture import GradientSketcher, select_layers


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 128)
        block = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(block, 2), nn.Linear(128, 100)

    def forward(self, input_ids):
        return self.head(self.enc(self.emb(input_ids)))


def workloads(quick: bool):
    import transformers as tr

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10)).eval()
    yield ("MLP 64-128-128-10, B=32", mlp,
           [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(20)],
           lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    yield ("nn.TransformerEncoder 2x128 (MHA), B=8 T=32", Encoder().eval(),
           [torch.randint(0, 100, (8, 32)) for _ in range(6)], lm_loss_plain)
    if not quick:
        cfg = tr.GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=64, vocab_size=8192)
        cfg._attn_implementation = "eager"
        yield ("GPT-2-style 4x256 (Conv1D), B=8 T=64", tr.GPT2LMHeadModel(cfg).eval(),
               [torch.randint(0, 8192, (8, 64)) for _ in range(2)], lm_loss)


def lm_loss_plain(model, ids):
    logits = model(input_ids=ids)[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def measure(name, model, batches, loss_fn, repeat: int) -> dict:
    layers = [layer for layer in select_layers(model) if layer.kind != "flat"]
    sk = GradientSketcher(model, layers, sparsification="identity", projection="identity",
                          verify=False)
    params = [p for p in model.parameters() if p.requires_grad]

    def plain(b):
        torch.autograd.grad(loss_fn(model, b).sum(), params, allow_unused=True)

    def recorded(b):
        sk._forward_backward(b, loss_fn, layers)

    best = {"plain": float("inf"), "recorded": float("inf")}
    for r in range(repeat):
        order = [("plain", plain), ("recorded", recorded)]
        for key, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.process_time()
            for b in batches:
                fn(b)
            best[key] = min(best[key], (time.process_time() - t0) / len(batches))
    return {"workload": name, "plain fwd+bwd ms": f"{1e3 * best['plain']:.2f}",
            "recorded fwd+bwd ms": f"{1e3 * best['recorded']:.2f}",
            "recorded / plain": f"{best['recorded'] / best['plain']:.3f}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure(*w, repeat=3 if args.quick else args.repeat) for w in workloads(args.quick)]
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))


if __name__ == "__main__":
    main()
