"""The HTTP API and page: ``create_app(index_dir)`` -> a FastAPI app; ``serve`` runs it.

    GET  /healthz                                   liveness: {"ok": true, ...}
    GET  /api/info                                  the index's config, the task's features, limits
    GET  /api/query?example=I&k=K[&opponents=1][&split=query|train][&images=1]
    POST /api/query   {"text": ...} | {"example": I} (JSON; k/opponents/images as fields)
                      or multipart with a file (.pt/.npy/.npz, as `query --input`)
    GET  /api/examples?split=query&offset=0&limit=50   ids and labels, for picking a query
    GET  /api/train/{id}                            a training example's label and image
    GET  /                                          the page

Replies to queries have the shape of `grass-index query --json`. Every error is
``{"error": ..., "fix": ...}`` with a 4xx status (a 500 only for a bug, never a traceback).
With a token, every request must carry it (``Authorization: Bearer T`` or ``?token=T``).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from .batching import MicroBatcher
from .guard import TOKEN_ENV, ApiError, Guard, check_bind
from .engine import Engine, Job, batch_friendly_search
from .page import page_html

log = logging.getLogger("grass_index.serve")

# ----------------------------------------------------------------------------- the app

def create_app(index_dir, task: str | None = None, token: str | None = None, *,
               max_k: int = 100, max_items: int = 64, max_body: int = 8 << 20,
               max_text: int = 10_000, batch_window_ms: float = 2.0, max_batch: int = 32,
               threads: int | None = None, allowed_hosts=None, verify: bool = True,
               engine: Engine | None = None):
    """Load the index, task and model once and return the FastAPI app that serves them.

    ``task`` names the task file to run (default: the one the index records). Limits:
    ``max_k`` results per direction, ``max_items`` examples per request, ``max_body`` bytes
    per request body, ``max_text`` characters of query text. Requests that arrive within
    ``batch_window_ms`` of each other are sketched and searched together (up to ``max_batch``
    jobs). ``threads`` sets torch's and FAISS's thread count for this process (one batch runs
    at a time; on a busy or small machine 1 thread is often fastest). ``allowed_hosts``
    (e.g. ``["127.0.0.1", "localhost"]``) refuses requests whose Host header names anything
    else; ``serve`` sets it when there is no token. A corrupted index raises ServeError with
    verify's findings (``verify=False`` skips the check).
    """
    if threads is not None:
        from grass_index.index.threads import configure_threads

        configure_threads(threads, torch_too=True)
    batch_friendly_search()

    eng = engine or Engine(index_dir, task, verify=verify)
    batcher = MicroBatcher(eng.run, window_ms=batch_window_ms, max_batch=max_batch)
    limits = dict(max_k=max_k, max_items=max_items, max_body=max_body, max_text=max_text)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.aclose()
        batcher.shutdown()

    app = FastAPI(title="grass-index", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine, app.state.batcher = eng, batcher

    def err(status, error, fix):
        return JSONResponse(dict(error=error, fix=fix), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return err(e.status, e.error, e.fix)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        if e.status_code == 404:
            return err(404, f"no such endpoint: {request.url.path}",
                       "the API is GET /api/query, POST /api/query, GET /api/info, "
                       "GET /api/examples, GET /api/train/{id}, GET /healthz and the page at /")
        if e.status_code == 405:
            return err(405, f"{request.method} is not allowed on {request.url.path}",
                       "use GET, or POST for /api/query")
        return err(e.status_code if 400 <= e.status_code < 500 else 400, str(e.detail),
                   "check the request against GET /api/info")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return err(400, f"bad request: {where}: {first.get('msg', 'invalid')}",
                   "check the parameter types (e.g. integer ids)")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return err(500, f"internal error {type(e).__name__}",
                   "this is a bug in grass-index serve; the server log has the details")

    # -- parameters ---------------------------------------------------------------------------
    def int_param(value, name, default, lo, hi, fix):
        if value is None or value == "":
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ApiError(400, f"{name}={value!r} is not an integer", fix)
        try:
            v = int(value)
        except ValueError:
            raise ApiError(400, f"{name}={value!r} is not an integer", fix) from None
        if not lo <= v <= hi:
            raise ApiError(400, f"{name}={v} is out of range", fix)
        return v

    def flag(value, name) -> bool:
        if value is None or value is False or value == "":
            return False
        if value is True:
            return True
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ApiError(400, f"{name}={value!r} is not a flag", f"use {name}=1 or {name}=0")

    def k_param(value) -> int:
        return int_param(value, "k", 10, 1, max_k, f"k must be between 1 and {max_k}")

    def split_data(split):
        if split not in ("query", "train"):
            raise ApiError(400, f"split={split!r} is unknown", "use split=query or split=train")
        data = eng.split(split)
        if data is None:
            raise ApiError(400, f"task {eng.task.ref} has no query data",
                           "use split=train, POST a text or an input file, or add "
                           "query_data() to the task")
        return data

    def example_job(example, split, k, opponents, images) -> Job:
        data = split_data(split)
        n = len(data)
        i = int_param(example, "example", None, 0, n - 1,
                      f"give an example number between 0 and {n - 1} ({split} data)")
        if i is None:
            raise ApiError(400, "no example given", "add ?example=I (see GET /api/examples), "
                           "or POST a text or an input file")
        return Job(items=[data[i]], ids=[i], source=f"{split}_data", k=k_param(k),
                   opponents=flag(opponents, "opponents"), images=flag(images, "images"))

    async def answer(job: Job) -> JSONResponse:
        t0 = time.perf_counter()
        res = await batcher.submit(job)
        # a plain JSONResponse: the reply is built of str/int/float already, so FastAPI's
        # recursive encoder would only cost time on the hot path
        return JSONResponse(dict(
            index=str(eng.path), task=eng.task.ref, k=job.k,
            ms_per_example=round(1000 * (time.perf_counter() - t0) / len(job.items), 3),
            batch=job.timing.get("batch"), results=res))

    async def guarded(job: Job) -> JSONResponse:
        try:
            return await answer(job)
        except ApiError:
            raise
        except ValueError as e:  # AttributionError, TaskError: the example does not fit
            raise ApiError(400, str(e), "send examples shaped and typed like the task's "
                           "training examples (GET /api/examples shows some)") from e

    # -- endpoints ------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return dict(ok=True, n_train=eng.idx.n_train, task=eng.task.ref)

    @app.get("/api/info")
    async def info():
        return dict(index=str(eng.path), task=eng.task.ref, n_train=eng.idx.n_train,
                    n_query=len(eng.queries) if eng.queries is not None else 0,
                    features=eng.features(), limits=limits,
                    batching=dict(window_ms=batch_window_ms, max_batch=max_batch,
                                  batches=batcher.batches, jobs=batcher.jobs),
                    load_seconds=round(eng.load_seconds, 3), config=eng.idx.config)

    @app.get("/api/query")
    async def query_get(request: Request):
        p = request.query_params
        job = example_job(p.get("example"), p.get("split", "query"), p.get("k"),
                          p.get("opponents"), p.get("images"))
        return await guarded(job)

    @app.post("/api/query")
    async def query_post(request: Request):
        p = dict(request.query_params)
        p.pop("token", None)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            raw = await request.body()
            try:
                body = json.loads(raw or b"null")
            except ValueError as e:
                raise ApiError(400, f"the body is not valid JSON ({e})",
                               'send e.g. {"text": "...", "k": 10}') from None
            if not isinstance(body, dict):
                raise ApiError(400, "the JSON body must be an object",
                               'send e.g. {"text": "...", "k": 10} or {"example": 3}')
            p.update(body)
            return await query_fields(p)
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=16)
            except ApiError:
                raise
            except Exception as e:
                raise ApiError(400, f"unreadable multipart body ({type(e).__name__}: {e})",
                               "upload one file as a form field named 'file'") from None
            upload = form.get("file")
            fields = {k: v for k, v in form.items() if k != "file"}
            p.update(fields)
            if upload is None or isinstance(upload, str):
                if "text" in fields or "example" in fields:
                    return await query_fields(p)
                raise ApiError(400, "no file in the upload", "send the examples file as a "
                               "form field named 'file' (e.g. curl -F file=@q.npz ...)")
            data = await upload.read()
            return await query_file(data, upload.filename or "upload", p)
        raise ApiError(415, f"unsupported content type {ctype or '(none)'!r}",
                       'send JSON ({"text": ...} or {"example": I}) or multipart/form-data '
                       "with a file field")

    async def query_fields(p: dict):
        extra = set(p) - {"text", "example", "split", "k", "opponents", "images"}
        if extra:
            raise ApiError(400, f"unknown fields {sorted(extra)}",
                           "use text or example, with k, opponents, images, split")
        if "text" in p and p["text"] is not None:
            text = p["text"]
            if "example" in p:
                raise ApiError(400, "both text and example given", "send one of them")
            if not isinstance(text, str) or not text.strip():
                raise ApiError(400, "text must be a non-empty string", 'send {"text": "..."}')
            if len(text) > max_text:
                raise ApiError(413, f"text of {len(text)} characters is over the limit of "
                               f"{max_text}", "send a shorter text")
            if not eng.task.has("encode"):
                raise ApiError(400, f"task {eng.task.ref} cannot turn text into an example",
                               "define encode(text) -> item in the task file, or query by "
                               "example id or an input file")
            k, opponents = k_param(p.get("k")), flag(p.get("opponents"), "opponents")
            try:
                items = await batcher.run_now(eng.encode, text)
            except ValueError as e:
                raise ApiError(400, str(e), "change the text so the task's encode() "
                               "accepts it") from e
            return await guarded(Job(items=items, ids=[0], source="text", k=k,
                                     opponents=opponents, images=flag(p.get("images"), "images")))
        return await guarded(example_job(p.get("example"), p.get("split", "query"), p.get("k"),
                                         p.get("opponents"), p.get("images")))

    async def query_file(data: bytes, name: str, p: dict):
        from grass_index.query.inputs import InputError, load_examples

        k, opponents = k_param(p.get("k")), flag(p.get("opponents"), "opponents")
        images = flag(p.get("images"), "images")
        try:
            items = await asyncio.to_thread(load_examples, data, name=Path(name).name)
        except InputError as e:
            raise ApiError(400, str(e), "upload a .pt, .npy or .npz file of examples, as "
                           "`grass-index query --input` reads") from None
        if not items:
            raise ApiError(400, f"{name} holds no examples", "upload at least one example")
        if len(items) > max_items:
            raise ApiError(413, f"{name} holds {len(items)} examples, over the limit of "
                           f"{max_items} per request", "split the file into smaller ones")
        return await guarded(Job(items=items, ids=list(range(len(items))), source=Path(name).name,
                                 k=k, opponents=opponents, images=images))

    @app.get("/api/examples")
    async def examples(request: Request):
        p = request.query_params
        split = p.get("split", "query")
        data = split_data(split)
        offset = int_param(p.get("offset"), "offset", 0, 0, max(0, len(data) - 1),
                           f"offset must be between 0 and {len(data) - 1}")
        limit = int_param(p.get("limit"), "limit", 50, 1, 500, "limit must be between 1 "
                          "and 500")
        rows = await batcher.run_now(eng.list_examples, split, offset, limit)
        return dict(split=split, total=len(data), offset=offset, examples=rows)

    @app.get("/api/train/{train_id}")
    async def train_example(train_id: str, request: Request):
        n = eng.idx.n_train
        i = int_param(train_id, "train id", None, 0, n - 1,
                      f"give a training id between 0 and {n - 1}")
        image = flag(request.query_params.get("image", "1"), "image")
        return await batcher.run_now(eng.train_example, i, image)

    @app.get("/api/self-influence")
    async def self_influence(request: Request):
        """Training examples ranked by self-influence (highest first: mislabelled and atypical
        examples), paged with ?offset=&limit=."""
        p = request.query_params
        n = eng.idx.n_train
        offset = int_param(p.get("offset"), "offset", 0, 0, max(0, n - 1),
                           f"offset must be between 0 and {n - 1}")
        limit = int_param(p.get("limit"), "limit", 20, 1, 500, "limit must be between 1 "
                          "and 500")
        images = flag(p.get("images"), "images")
        out = await batcher.run_now(eng.self_influence, offset, limit, images)
        return dict(index=str(eng.path), **out)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(page_html(nonce), headers={
            "content-security-policy": (f"default-src 'none'; script-src 'nonce-{nonce}'; "
                                        f"style-src 'nonce-{nonce}'; img-src data:; "
                                        "connect-src 'self'; base-uri 'none'; "
                                        "form-action 'none'; frame-ancestors 'none'")})

    app.add_middleware(Guard, token=token, max_body=max_body, hosts=allowed_hosts)
    return app


def serve(index_dir, *, host: str = "127.0.0.1", port: int = 8000, task: str | None = None,
          token: str | None = None, access_log: bool = False, **options) -> None:
    """Check the bind, load everything, then run uvicorn until interrupted."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    check_bind(host, token)
    if not token:  # loopback only: also refuse other Host names (DNS rebinding)
        options.setdefault("allowed_hosts", ["127.0.0.1", "localhost", "::1", host])
    app = create_app(index_dir, task=task, token=token, **options)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {index_dir} on http://{shown}:{port}/"
          + (" (token required)" if token else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log)
