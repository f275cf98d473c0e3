"""A small async micro-batcher: requests that arrive together run as one call.

Sketching a query pays a fixed cost per call (a sketcher bound to the model, a forward and a
backward) and a flat FAISS search scans every stored vector once per call however many
queries it holds, so answering 16 concurrent queries in one call is much cheaper than 16
calls. The batcher waits at most ``window_ms`` after the first request for others to join,
and while one batch runs, the next one fills up by itself. All the work happens on ONE
worker thread: the model's capture hooks are not safe to use from two threads at once, and
the event loop stays free to accept connections.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class MicroBatcher:
    """``await submit(job)`` -> ``run(jobs)[i]`` for that job, jobs grouped into batches.

    ``run(jobs)`` is called on the worker thread with up to ``max_batch`` jobs and returns one
    result per job; a result that is an Exception is raised to that job's caller only.
    """

    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], *, window_ms: float = 2.0,
                 max_batch: int = 32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        self._run = run
        self.window = window_ms / 1000.0
        self.max_batch = int(max_batch)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grass-index-serve")
        self.batches = 0  # calls to run(), and the jobs they held (for /api/info)
        self.jobs = 0

    async def submit(self, job) -> Any:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._queue = asyncio.Queue()  # (a new event loop, e.g. a second test client)
            self._task = loop.create_task(self._loop())
        fut = loop.create_future()
        await self._queue.put((job, fut))
        return await fut

    async def run_now(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` on the worker thread (between batches), e.g. a training example's
        image: the task's code then never runs on two threads at once."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        while True:
            batch = [await q.get()]
            deadline = loop.time() + self.window
            while len(batch) < self.max_batch:
                if not q.empty():
                    batch.append(q.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(job, fut) for job, fut in batch if not fut.cancelled()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._run,
                                                     [job for job, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch runner returned {len(results)} results for "
                                       f"{len(batch)} jobs")
            except Exception as e:  # the whole batch failed: every caller gets the error
                results = [e] * len(batch)
            self.batches += 1
            self.jobs += len(batch)
            for (_, fut), res in zip(batch, results):
                if fut.cancelled():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
