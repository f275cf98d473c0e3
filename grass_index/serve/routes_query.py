"""``/api/query``: top-k proponents (and opponents) for an example of the task's data (GET, or
a JSON body), a text the task encodes, or an uploaded examples file (multipart). Parameters
are validated by FastAPI/pydantic (see params.py); what depends on the data (an example id
below the split's length, text length, the upload's size) is checked here."""
# (no `from __future__ import annotations`: FastAPI reads the route annotations, some local)

import asyncio
import time
from pathlib import Path
from typing import Annotated, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .context import Served
from .engine import Job, NonFiniteQuery
from .errors import ApiError, validation_error
from .params import QueryFields, Split

SHAPE_FIX = ("send examples shaped, typed and scaled like the task's training examples "
             "(GET /api/examples shows some)")
UPLOAD_FIX = ("upload a .pt, .npy or .npz file of examples (a tensor or array split along its "
              "first dimension, or named arrays of equal length)")
POST_BODY = {"requestBody": {"content": {
    "application/json": {"schema": QueryFields.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": ".pt, .npy or .npz of examples (split along the first "
                                "dimension)"},
        **{k: v for k, v in QueryFields.model_json_schema()["properties"].items()
           if k in ("k", "opponents", "images")}}}}}}}


def query_router(served: Served) -> APIRouter:
    """The routes, with k's bound (the server's --max-k) in their declared parameters."""
    router = APIRouter(tags=["query"])
    K = Annotated[int, Query(ge=1, le=served.limits.max_k, description="results per direction")]

    @router.get("/api/query", summary="Top-k for an example of the query or training data")
    async def query_get(example: Annotated[Optional[int], Query(ge=0)] = None, k: K = 10,
                        opponents: bool = False, images: bool = False, split: Split = "query"):
        fields = QueryFields(example=example, k=k, opponents=opponents, images=images,
                             split=split)
        return await answer(served, example_job(served, fields))

    @router.post("/api/query", openapi_extra=POST_BODY,
                 summary="Top-k for a text, an example id (JSON) or an uploaded file")
    async def query_post(request: Request):
        params = {k: v for k, v in request.query_params.items() if k != "token"}
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            return await query_json(served, await request.body(), params)
        if ctype == "multipart/form-data":
            return await query_multipart(served, request, params)
        raise ApiError(415, f"unsupported content type {ctype or '(none)'!r}",
                       'send JSON ({"text": ...} or {"example": I}) or multipart/form-data '
                       "with a file field")

    return router


def fields_of(served: Served, values: dict) -> QueryFields:
    try:
        return QueryFields.model_validate(values, context=dict(max_k=served.limits.max_k))
    except ValidationError as e:
        raise validation_error(e.errors(), served.limits.fixes()) from None


async def query_json(served: Served, raw: bytes, params: dict):
    try:  # pydantic's JSON parser: a nesting bomb is a parse error, not a RecursionError
        body = QueryFields.model_validate_json(raw or b"{}")
    except ValidationError as e:
        raise validation_error(e.errors(), served.limits.fixes()) from None
    fields = fields_of(served, {**params, **body.model_dump(exclude_unset=True)})
    if fields.text is not None:
        return await query_text(served, fields)
    return await answer(served, example_job(served, fields))


async def query_multipart(served: Served, request: Request, params: dict):
    try:
        form = await request.form(max_files=1, max_fields=16)
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(400, f"unreadable multipart body ({type(e).__name__}: {e})",
                       "upload one file as a form field named 'file'") from None
    upload = form.get("file")
    texts = {k: v for k, v in form.items() if isinstance(v, str)}  # files: only 'file'
    fields = fields_of(served, {**params, **texts})
    if upload is None or isinstance(upload, str):
        if fields.text is not None:
            return await query_text(served, fields)
        if fields.example is not None:
            return await answer(served, example_job(served, fields))
        raise ApiError(400, "no file in the upload", "send the examples file as a form field "
                       "named 'file' (e.g. curl -F file=@q.npz ...)")
    name = Path(upload.filename or "upload").name
    return await query_file(served, await upload.read(), name, fields)


def example_job(served: Served, fields: QueryFields) -> Job:
    data = served.split(fields.split)
    if fields.example is None:
        raise ApiError(400, "no example given", "add ?example=I (see GET /api/examples), or "
                       "POST a text or an input file")
    n = len(data)
    if fields.example >= n:
        raise ApiError(400, f"example={fields.example} is out of range (at most {n - 1})",
                       f"give an example number between 0 and {n - 1} ({fields.split} data)")
    return Job(items=[data[fields.example]], ids=[fields.example],
               source=f"{fields.split}_data", k=fields.k, opponents=fields.opponents,
               images=fields.images)


async def query_text(served: Served, fields: QueryFields):
    eng, max_text = served.engine, served.limits.max_text
    if fields.example is not None:
        raise ApiError(400, "both text and example given", "send one of them")
    if len(fields.text) > max_text:
        raise ApiError(413, f"text of {len(fields.text)} characters is over the limit of "
                       f"{max_text}", "send a shorter text")
    if not eng.task.has("encode"):
        raise ApiError(400, f"task {eng.task.ref} cannot turn text into an example",
                       "define encode(text) -> item in the task file, or query by example id "
                       "or an input file")
    try:
        items = await served.batcher.run_now(eng.encode, fields.text)
    except ValueError as e:
        raise ApiError(400, str(e), "change the text so the task's encode() accepts it") from e
    return await answer(served, Job(items=items, ids=[0], source="text", k=fields.k,
                                    opponents=fields.opponents, images=fields.images))


async def query_file(served: Served, data: bytes, name: str, fields: QueryFields):
    from grass_index.input_budget import InputRefused
    from grass_index.query.inputs import InputError, load_examples

    try:  # the file's headers are checked against the budget before anything is unpacked
        items = await asyncio.to_thread(load_examples, data, name=name, budget=served.budget)
    except InputRefused as e:
        raise ApiError(413 if "over" in str(e) else 400, str(e), UPLOAD_FIX) from None
    except InputError as e:
        raise ApiError(400, str(e), UPLOAD_FIX) from None
    if not items:
        raise ApiError(400, f"{name} holds no examples", "upload at least one example")
    if len(items) > served.limits.max_items:
        raise ApiError(413, f"{name} holds {len(items)} examples, over the limit of "
                       f"{served.limits.max_items} per request", "split the file into smaller "
                       "ones")
    return await answer(served, Job(items=items, ids=list(range(len(items))), source=name,
                                    k=fields.k, opponents=fields.opponents,
                                    images=fields.images))


async def answer(served: Served, job: Job) -> JSONResponse:
    """The batch's answer for this job, in the shape of `grass-index query --json`."""
    t0 = time.perf_counter()
    try:
        res = await served.batcher.submit(job)
    except NonFiniteQuery as e:
        raise ApiError(400, str(e), "send values in the range of the training data (e.g. "
                       "features scaled like them)") from e
    except ApiError:
        raise
    except ValueError as e:  # AttributionError, TaskError: the example does not fit
        raise ApiError(400, str(e), SHAPE_FIX) from e
    eng = served.engine
    # a plain JSONResponse: the reply is built of str/int/float already, so FastAPI's
    # recursive encoder would only cost time on the hot path
    return JSONResponse(dict(
        index=str(eng.path), task=eng.task.ref, k=job.k,
        ms_per_example=round(1000 * (time.perf_counter() - t0) / len(job.items), 3),
        batch=job.timing.get("batch"), results=res))
