"""The HTTP API and page: ``create_app(index_dir)`` -> a FastAPI app; ``serve`` runs it.

    GET  /healthz                                   liveness: {"ok": true, ...}
    GET  /api/info                                  the index's config, the task's features, limits
    GET  /api/query?example=I&k=K[&opponents=1][&split=query|train][&images=1]
    POST /api/query   {"text": ...} | {"example": I} (JSON; k/opponents/images as fields)
                      or multipart with a file (.pt/.npy/.npz, as `query --input`)
    GET  /api/examples?split=query&offset=0&limit=50   ids and labels, for picking a query
    GET  /api/train/{id}                            a training example's label and image
    GET  /api/self-influence?offset=0&limit=20      training examples by self-influence
    GET  /api/stats?since=T                         the server's own timings (stats.py)
    GET  /docs, /openapi.json                       the API's docs (same guard as the API)
    GET  /                                          the page

Replies to queries have the shape of `grass-index query --json`. Every error is
``{"error": ..., "fix": ...}`` with a 4xx status (a 500 only for a bug, never a traceback).
With a token, every request must carry it (``Authorization: Bearer T`` or ``?token=T``).
Routes live in routes_query.py and routes_browse.py, parameters in params.py, the guards in
guard.py, error replies in errors.py.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html

from grass_index.input_budget import InputBudget

from .batching import MicroBatcher
from .context import Served
from .engine import Engine, batch_friendly_search
from .errors import install_error_handlers
from .guard import TOKEN_ENV, Guard, HostCheck, check_bind, loopback_hosts
from .params import Limits
from .routes_browse import browse_router
from .routes_query import query_router
from .stats import RequestTimer, ServerStats

log = logging.getLogger("grass_index.serve")


def create_app(index_dir, task: str | None = None, token: str | None = None, *,
               max_k: int = 100, max_items: int = 64, max_body: int = 8 << 20,
               max_text: int = 10_000, batch_window_ms: float = 2.0, max_batch: int = 32,
               threads: int | None = None, allowed_hosts=None, verify: bool = True,
               engine: Engine | None = None) -> FastAPI:
    """Load the index, task and model once and return the FastAPI app that serves them.

    ``task`` names the task file to run (default: the one the index records). Limits:
    ``max_k`` results per direction, ``max_items`` examples per request, ``max_body`` bytes
    per request body, ``max_text`` characters of query text; an uploaded file may unpack to
    at most ``max_items`` examples shaped like the index's training examples. Requests that
    arrive within ``batch_window_ms`` of each other are sketched and searched together (up
    to ``max_batch`` jobs). ``threads`` sets torch's and FAISS's thread count for this process
    (one batch runs at a time; on a busy or small machine 1 thread is often fastest).
    ``allowed_hosts`` (e.g. ``["127.0.0.1", "localhost"]``) refuses requests whose Host
    header names anything else; ``serve`` sets it when there is no token. A corrupted index
    raises ServeError with verify's findings (``verify=False`` skips the check).
    """
    if threads is not None:
        from grass_index.index.threads import configure_threads

        configure_threads(threads, torch_too=True)
    batch_friendly_search()
    eng = engine or Engine(index_dir, task, verify=verify)
    limits = Limits(max_k=max_k, max_items=max_items, max_body=max_body, max_text=max_text)
    stats = ServerStats()
    served = Served(engine=eng, limits=limits, stats=stats,
                    batcher=MicroBatcher(stats.timed(eng.run), window_ms=batch_window_ms,
                                         max_batch=max_batch),
                    budget=InputBudget.for_signature(eng.idx.record.item_signature,
                                                     max_items))

    app = FastAPI(title="grass-index", summary="Training-data attribution over an index",
                  docs_url=None, redoc_url=None, lifespan=lifespan(served))
    app.state.served = served
    app.state.engine, app.state.batcher = eng, served.batcher  # (kept for callers and tests)
    install_error_handlers(app, limits.fixes())
    app.include_router(query_router(served))
    app.include_router(browse_router(served))
    app.add_api_route("/docs", docs, include_in_schema=False)
    app.add_middleware(Guard, token=token, max_body=max_body)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, hosts=allowed_hosts)  # first of the checks
    app.add_middleware(RequestTimer, stats=stats)  # outermost: times all of it
    return app


_running = []  # apps between startup and shutdown in this process (tests run several)


def lifespan(served: Served):
    @contextlib.asynccontextmanager
    async def run(app):
        await served.batcher.run_now(served.engine.warm_up)  # on the thread that serves
        # What is loaded now (torch, the model, the index, the data: ~10^5-10^6 objects) lives
        # as long as the server. Without this, each full collection walks all of it (a pause
        # of ~0.15-0.7 s for every request in flight); frozen, it walks only what came after.
        gc.collect()
        gc.freeze()
        served.frozen = gc.get_freeze_count()  # (walks the frozen list: once, here)
        served.stats.install()  # every collection's pause from now on (GET /api/stats)
        _running.append(app)
        try:
            yield
        finally:
            served.stats.uninstall()
            await served.batcher.aclose()
            served.batcher.shutdown()
            _running.remove(app)
            if not _running:  # the last one: what it held may be collected again
                gc.unfreeze()
    return run


async def docs(request: Request):
    """Swagger UI over /openapi.json; a token given as ?token= is passed on to the schema."""
    token = request.query_params.get("token")
    schema = "/openapi.json" + (f"?token={quote(token, safe='')}" if token else "")
    return get_swagger_ui_html(openapi_url=schema, title="grass-index API")


def serve(index_dir, *, host: str = "127.0.0.1", port: int = 8000, task: str | None = None,
          token: str | None = None, access_log: bool = False, **options) -> None:
    """Check the bind, load everything, bind the port, say which, then run uvicorn until
    interrupted."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    check_bind(host, token)
    if not token:  # loopback only: also refuse other Host names (DNS rebinding)
        options.setdefault("allowed_hosts", loopback_hosts(host))
    app = create_app(index_dir, task=task, token=token, **options)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            access_log=access_log)
    sock = config.bind_socket()  # bound before it is announced: --port 0 shows the real port
    sock.listen(config.backlog)  # a client that reads the line may connect at once
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {index_dir} on http://{shown}:{sock.getsockname()[1]}/"
          + (" (token required)" if token else ""), file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])
