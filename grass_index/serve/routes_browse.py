"""Everything but the query itself: liveness, the index's description, pages of example ids
and labels, one training example, the self-influence ranking, and the HTML page."""
# (no `from __future__ import annotations`: FastAPI reads the route annotations, some local)

import gc
import secrets
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse

from .context import Served
from .errors import ApiError
from .page import page_html
from .params import PAGE_LIMIT, Split

Offset = Annotated[int, Query(ge=0, description="first row, counted from 0")]
Limit = Annotated[int, Query(ge=1, le=PAGE_LIMIT, description="rows per page")]


def browse_router(served: Served) -> APIRouter:
    router = APIRouter(tags=["browse"])
    eng = served.engine

    @router.get("/healthz", summary="Liveness")
    async def healthz():
        return dict(ok=True, n_train=eng.idx.n_train, task=eng.task.ref)

    @router.get("/api/info", summary="The index's config, the task's features, limits")
    async def info():
        return describe(served)

    @router.get("/api/stats", summary="The server's own timings: GC pauses, requests, batches")
    async def stats(since: Annotated[float, Query(description="time.monotonic() seconds: "
                                                  "samples that started then or later")] = 0.0):
        return served.stats.since(since)

    @router.get("/api/examples", summary="Ids and labels to pick a query from")
    async def examples(split: Split = "query", offset: Offset = 0,
                       limit: Limit = 50):
        data = served.split(split)
        check_offset(offset, len(data))
        rows = await served.batcher.run_now(eng.list_examples, split, offset, limit)
        return dict(split=split, total=len(data), offset=offset, examples=rows)

    @router.get("/api/train/{train_id}", summary="A training example's label and image")
    async def train_example(train_id: Annotated[int, Path(ge=0)], image: bool = True):
        if train_id >= eng.idx.n_train:
            raise ApiError(400, f"train_id={train_id} is out of range (at most "
                           f"{eng.idx.n_train - 1})", "give a training id between 0 and "
                           f"{eng.idx.n_train - 1}")
        return await served.batcher.run_now(eng.train_example, train_id, image)

    @router.get("/api/self-influence", summary="Training examples ranked by self-influence")
    async def self_influence(offset: Offset = 0, limit: Limit = 20,
                             images: bool = False):
        """Highest first: mislabelled and atypical examples."""
        check_offset(offset, eng.idx.n_train)
        out = await served.batcher.run_now(eng.self_influence, offset, limit, images)
        return dict(index=str(eng.path), **out)

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(page_html(nonce), headers={
            "content-security-policy": (f"default-src 'none'; script-src 'nonce-{nonce}'; "
                                        f"style-src 'nonce-{nonce}'; img-src data:; "
                                        "connect-src 'self'; base-uri 'none'; "
                                        "form-action 'none'; frame-ancestors 'none'")})

    return router


def describe(served: Served) -> dict:
    eng, b = served.engine, served.batcher
    return dict(index=str(eng.path), task=eng.task.ref, n_train=eng.idx.n_train,
                n_query=len(eng.queries) if eng.queries is not None else 0,
                features=eng.features(),
                limits=dict(max_k=served.limits.max_k, max_items=served.limits.max_items,
                            max_body=served.limits.max_body, max_text=served.limits.max_text,
                            max_upload_bytes=served.budget.max_bytes),
                batching=dict(window_ms=1000 * b.window, max_batch=b.max_batch,
                              batches=b.batches, jobs=b.jobs),
                gc=dict(frozen=served.frozen,
                        collections=[g["collections"] for g in gc.get_stats()]),
                load_seconds=round(eng.load_seconds, 3), config=eng.idx.config)


def check_offset(offset: int, n: int) -> None:
    if offset > max(0, n - 1):
        raise ApiError(400, f"offset={offset} is out of range (at most {max(0, n - 1)})",
                       f"offset must be between 0 and {max(0, n - 1)}")
