"""Progress of a build, drawn one way for everyone (library and CLI):

    progress=True       with a terminal on stderr: rich bars, one per phase; without one (stderr
                        to a log file): a plain line per phase every ~10 s,
                        ``pass 1: sketching gradients: 120/450, 38.2/s, ETA 8.6 s``
    progress=callable   gets (phase, done, total) calls (how tests and tools observe a build)
    progress=False      nothing

Phases: sketch, merge, fisher, index, and done (1/1 once config.json is written); `eval`
draws its ground-truth retraining with the same component.

A build's plan (RAM/disk, before pass 1) and its ETA (after pass 1's first timed batch) are
``note`` lines of the same component: printed above the bars or among the log lines, and
logged at INFO when the caller draws nothing itself (a callback, or progress=False).
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("grass_index")

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
        self.stream = stream
        self._eta = None  # (stage, seconds after it, what follows it, first (time, done) seen)
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

    def note(self, text: str) -> None:
        """One line for whoever reads this build: above the bars, among the log lines, or (when
        nothing is drawn here) the log at INFO."""
        if self.inner is not None:
            self.inner.note(text)
            return
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        elif self.lines is not None:
            print(text, file=self.lines.stream, flush=True)
        else:
            log.info("%s", text)

    def eta_after_first(self, stage: str, then_seconds: float, then: str) -> None:
        """Note the ETA once ``stage`` has timed one step past its first: the rest of it at
        that rate, plus ``then_seconds`` (an estimate) for ``then``."""
        self._eta = (stage, float(then_seconds), then, None)

    def _check_eta(self, stage: str, done: int, total: int) -> None:
        want, extra, then, first = self._eta
        if stage != want:
            return
        now = time.perf_counter()
        if first is None:
            self._eta = (want, extra, then, (now, done))
        elif done > first[1]:
            per = (now - first[0]) / (done - first[1])
            self._eta = None
            self.note(f"ETA: {LABELS.get(stage, stage)} {_eta(per * (total - done))} more "
                      f"({per:.1f} s per step), {then} about {_eta(extra)}")

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.inner is not None:
            self.inner(stage, done, total)
        if self.cb is not None:
            self.cb(stage, done, total)
        if stage == "done":
            return
        if self._eta is not None:
            self._check_eta(stage, done, total)
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
