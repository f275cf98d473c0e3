"""Serve an index over HTTP: the model, task and index stay loaded between queries.

    from grass_index.serve import create_app   # a FastAPI app (needs the `serve` extra)
    grass-index serve runs/digits               # the same, under uvicorn on 127.0.0.1:8000

Modules: ``engine`` (what is loaded, and answering a batch of queries), ``batching`` (the
async micro-batcher), ``guard`` (bind check; Host, token and body-size checks), ``app``
(routes, limits, errors), ``page`` (the HTML page).
"""
from __future__ import annotations

from .engine import Engine, ServeError  # noqa: F401


def create_app(*args, **kwargs):
    """See :func:`grass_index.serve.app.create_app` (imported lazily: FastAPI is optional)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app", "Engine", "ServeError"]
