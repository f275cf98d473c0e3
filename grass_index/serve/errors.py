"""Every refusal is ``{"error": what is wrong, "fix": how to fix it}`` with a 4xx status: the
API's own refusals (ApiError), Starlette's (404, 405), FastAPI's and pydantic's validation
errors, said in the words of the parameter that was wrong. A 500 is a bug and carries no
traceback (the server log has it)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

log = logging.getLogger("grass_index.serve")

ENDPOINTS = ("GET /api/query, POST /api/query, GET /api/info, GET /api/examples, "
             "GET /api/train/{id}, GET /api/self-influence, GET /healthz, the page at / and "
             "the API's docs at /docs")


class ApiError(Exception):
    """A request the server refuses: HTTP status, what is wrong, and how to fix it."""

    def __init__(self, status: int, error: str, fix: str):
        super().__init__(error)
        self.status, self.error, self.fix = status, error, fix


def error_response(status: int, error: str, fix: str, headers=None) -> JSONResponse:
    return JSONResponse(dict(error=error, fix=fix), status_code=status, headers=headers)


def validation_error(errors: list, fixes: dict) -> ApiError:
    """The first of pydantic's errors as one ApiError: ``k=0 is out of range (at least 1)``.
    ``fixes`` maps a parameter's name to how to fix it."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body")]
    name = loc[-1] if loc else "request"
    value, kind, ctx = first.get("input"), first.get("type", ""), first.get("ctx") or {}
    plain = not isinstance(value, str) or (value and not any(c.isspace() for c in value))
    shown = f"{name}={value}" if plain else f"{name}={value!r}"
    if kind == "extra_forbidden":
        extra = sorted(str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden")
        return ApiError(400, f"unknown fields {extra}",
                        "use text or example, with k, opponents, images, split")
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bound = {"greater_than_equal": "at least", "less_than_equal": "at most",
                 "greater_than": "above", "less_than": "below"}[kind]
        bound_value = next(iter(ctx.values()), "?")
        error = f"{shown} is out of range ({bound} {bound_value})"
    elif kind.startswith("int_"):
        error = f"{shown} is not an integer"
    elif kind.startswith("bool_"):
        error = f"{shown} is not a flag"
        fixes = {**fixes, name: f"use {name}=1 or {name}=0"}
    elif kind == "literal_error":
        error = f"{shown} is unknown (expected {ctx.get('expected', '?')})"
    elif kind == "model_type" or kind == "model_attributes_type":
        return ApiError(400, "the JSON body must be an object",
                        'send e.g. {"text": "...", "k": 10} or {"example": 3}')
    elif kind.startswith("json_") or kind == "recursion_loop":
        return ApiError(400, f"the body is not valid JSON ({first.get('msg', kind)})",
                        'send e.g. {"text": "...", "k": 10}')
    else:
        error = f"{shown}: {first.get('msg', 'invalid')}"
    return ApiError(400, error, fixes.get(name, "check the request against GET /api/info "
                                                "(and the API's docs at /docs)"))


def install_error_handlers(app: FastAPI, fixes: dict) -> None:
    """Route every exception a request can raise to a JSON ``{"error", "fix"}`` reply."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.error, e.fix)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            return error_response(404, f"no such endpoint: {request.url.path}",
                                  f"the API is {ENDPOINTS}")
        if e.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on "
                                  f"{request.url.path}", "use GET, or POST for /api/query")
        status = e.status_code if 400 <= e.status_code < 500 else 400
        return error_response(status, str(e.detail), "check the request against GET /api/info")

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, e: RequestValidationError):
        refusal = validation_error(list(e.errors()), fixes)
        return error_response(refusal.status, refusal.error, refusal.fix)

    @app.exception_handler(ValidationError)
    async def _model_invalid(request: Request, e: ValidationError):
        refusal = validation_error(e.errors(), fixes)
        return error_response(refusal.status, refusal.error, refusal.fix)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error {type(e).__name__}",
                              "this is a bug in the grass-index server; the server log has the "
                              "details")
