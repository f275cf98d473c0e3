"""What the server measures about itself, so a stall can be told apart from a loaded machine:
each garbage collection's pause (``gc.callbacks``: wall time, and the CPU time of the thread
that collected, which a busy machine does not inflate), each request's handling time (from
the ASGI call to its last byte sent) and each batch's run on the worker thread (wall and that
thread's CPU time). Recent samples are kept in bounded rings; ``GET /api/stats?since=T`` returns
the ones that started at or after T (``time.monotonic()`` seconds: CLOCK_MONOTONIC, the clock
a client on this machine reads too).
"""
from __future__ import annotations

import gc
import time
from collections import deque

KEEP = 4096  # samples kept per kind


class ServerStats:
    def __init__(self, keep: int = KEEP):
        self.gc: deque = deque(maxlen=keep)        # (start, generation, wall ms, cpu ms)
        self.requests: deque = deque(maxlen=keep)  # (start, wall ms, path)
        self.batches: deque = deque(maxlen=keep)   # (start, jobs, wall ms, cpu ms)
        self._gc_start: tuple[float, float] | None = None

    # -- garbage collections ---------------------------------------------------------------
    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = (time.monotonic(), time.thread_time())
        elif self._gc_start is not None:  # collections never overlap (the GIL)
            t0, c0 = self._gc_start
            self._gc_start = None
            self.gc.append((t0, info.get("generation"), 1e3 * (time.monotonic() - t0),
                            1e3 * (time.thread_time() - c0)))

    def install(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    # -- batches (called on the worker thread) ----------------------------------------------
    def timed(self, run):
        """``run`` wrapped to record each call's wall and CPU time (of the thread it runs on)."""
        def timed_run(jobs):
            t0, c0 = time.monotonic(), time.thread_time()
            try:
                return run(jobs)
            finally:
                self.batches.append((t0, len(jobs), 1e3 * (time.monotonic() - t0),
                                     1e3 * (time.thread_time() - c0)))
        return timed_run

    def since(self, t: float) -> dict:
        pick = lambda ring: [list(s) for s in list(ring) if s[0] >= t]  # noqa: E731
        return dict(now=time.monotonic(), gc=pick(self.gc), requests=pick(self.requests),
                    batches=pick(self.batches),
                    fields=dict(gc=["start", "generation", "wall_ms", "cpu_ms"],
                                requests=["start", "wall_ms", "path"],
                                batches=["start", "jobs", "wall_ms", "cpu_ms"]))


class RequestTimer:
    """Pure ASGI middleware: records each HTTP request's handling time in ``stats``."""

    def __init__(self, app, stats: ServerStats):
        self.app, self.stats = app, stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        try:
            return await self.app(scope, receive, send)
        finally:
            self.stats.requests.append((t0, 1e3 * (time.monotonic() - t0), scope.get("path")))
