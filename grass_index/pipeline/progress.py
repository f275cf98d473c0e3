"""Progress of a build, drawn one way for everyone (library and CLI):

    progress=True       with a terminal on stderr: rich bars, one per phase; without one (stderr
                        to a log file): a plain line per phase every ~10 s,
                        ``pass 1: sketching gradients: 120/450, 38.2/s, ETA 8.6 s``
    progress=callable   gets (phase, done, total) calls (how tests and tools observe a build)
    progress=False      nothing

Phases: sketch, merge, fisher, index, and done (1/1 once config.json is written); `eval`
draws its ground-truth retraining with the same component.
"""
from __future__ import annotations

import sys
import time

LABELS = {"sketch": "pass 1: sketching gradients", "merge": "merging shards",
          "fisher": "pass 2: Fisher", "index": "pass 2: preconditioning + FAISS",
          "ground truth": "LDS ground truth: retraining on subsets"}
LOG_EVERY_S = 10.0


def _eta(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


class Progress:
    """A (phase, done, total) callback: bars on a terminal, periodic lines in a log, or the
    caller's callback. ``close()`` (or leaving the ``with`` block) removes the bars."""

    def __init__(self, progress, *, stream=None, every: float = LOG_EVERY_S):
        self.cb = progress if callable(progress) and not isinstance(progress, Progress) else None
        self.inner = progress if isinstance(progress, Progress) else None
        self.bar = None
        self.tasks = {}
        self.lines = None
        if progress is True:
            from rich.console import Console

            err = Console(stderr=True) if stream is None else Console(file=stream)
            if err.is_terminal:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bars,
                                           TextColumn, TimeRemainingColumn)

                self.bar = Bars(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                                transient=True)
                self.bar.start()
            else:
                self.lines = _Lines(stream if stream is not None else sys.stderr, every)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.inner is not None:
            self.inner(stage, done, total)
        if self.cb is not None:
            self.cb(stage, done, total)
        if stage == "done":
            return
        if self.bar is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(LABELS.get(stage, stage), total=total)
            self.bar.update(self.tasks[stage], completed=done, total=total)
        if self.lines is not None:
            self.lines(stage, done, total)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Lines:
    """``phase: done/total, rate/s, ETA`` at most every ``every`` seconds per phase, and a last
    line when a phase that was logged completes (short phases print nothing)."""

    def __init__(self, stream, every: float):
        self.stream, self.every = stream, every
        self.state = {}  # phase -> (t0, done0, last print time, printed)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        t0, done0, last, printed = self.state.setdefault(stage, (now, done, now, False))
        finished = total and done >= total
        if now - last < self.every and not (finished and printed):
            return
        if finished and printed and last == -1:
            return
        elapsed = max(now - t0, 1e-9)
        rate = (done - done0) / elapsed
        eta = _eta((total - done) / rate) if rate > 0 and total else "?"
        print(f"{LABELS.get(stage, stage)}: {done}/{total}, {rate:.1f}/s, ETA {eta}",
              file=self.stream, flush=True)
        self.state[stage] = (t0, done0, -1 if finished else now, True)
