"""Serve an index over HTTP: the model, task and index stay loaded between queries.

    from grass_index.serve import create_app   # a FastAPI app (needs the `serve` extra)
    grass-index serve runs/digits               # the same, under uvicorn on 127.0.0.1:8000

Modules: ``engine`` (what is loaded, and answering a batch of queries), ``batching`` (the
async micro-batcher), ``app`` (create_app: wiring; serve: uvicorn), ``routes_query`` and
``routes_browse`` (the FastAPI routers), ``params`` (limits and pydantic models),
``context`` (what the routes share), ``errors`` (every refusal as JSON), ``guard`` (bind
check; Host names, token, cross-origin writes, body size), ``page`` (the HTML page). What an
uploaded file may unpack to is checked in ``grass_index.input_budget``.
"""
from __future__ import annotations

from .engine import Engine, ServeError  # noqa: F401


def create_app(*args, **kwargs):
    """See :func:`grass_index.serve.app.create_app` (imported lazily: FastAPI is optional)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app", "Engine", "ServeError"]
