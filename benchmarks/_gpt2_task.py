"""The real-size language-model setup the LM benchmarks share: GPT-2 small from its config with
random weights (nothing downloaded), saved once under a work directory, a generated text
corpus, and examples/hf_causal_lm.py as the task; plus the process's peak RSS."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the index answers which training examples made the model behave this way on this "
         "input and it builds an attribution index over a training corpus once then answers "
         "queries in milliseconds with sketches of gradients and a preconditioner").split()


def status_bytes(field: str) -> float:
    """A byte count from /proc/self/status (``VmHWM``, ``RssAnon``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    return float("nan")


def peak_rss_bytes() -> float:
    """This process's peak resident set (VmHWM), in bytes."""
    return status_bytes("VmHWM")


class AnonPeak:
    """The peak of this process's anonymous memory (RssAnon), sampled every 0.2 s by a thread:
    what the plan prices. VmHWM also counts file-backed pages — LMDB's and memory-mapped
    arrays', which are page cache the kernel reclaims — so it runs above the plan by the store
    it read (docs/measurements.md, *Plan accuracy*)."""

    def __init__(self, every: float = 0.2):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        return status_bytes("RssAnon")

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, self.now())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def gpt2_task(work: Path, n: int, tokens: int, n_layer: int = 12):
    """The examples/hf_causal_lm.py task over a random-init GPT-2 small (``n_layer`` blocks;
    12 is GPT-2 small itself) saved in ``work`` and ``n`` generated lines of 40 words,
    truncated to ``tokens`` tokens."""
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = work / ("gpt2" if n_layer == 12 else f"gpt2-{n_layer}")
    if not (model_dir / "config.json").exists():
        GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 40)) for _ in range(n)]
    (work / "train.txt").write_text("\n".join(lines) + "\n")
    os.environ.update(GRASS_INDEX_MODEL_PATH=str(model_dir),
                      GRASS_INDEX_TEXT_FILE=str(work / "train.txt"),
                      GRASS_INDEX_MAX_LENGTH=str(tokens))
    sys.path.insert(0, str(ROOT / "examples"))
    import hf_causal_lm as task

    return task
