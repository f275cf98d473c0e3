"""`grass-index serve DIR`: an HTTP API and a page over an index, the model kept loaded.

Kept in its own module; the main CLI wires it with ``serve_cmd.register(app)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import errors, fail
from .task_opts import data_option, hf_model_option, named_task


def serve_command(
    directory: Path = typer.Argument(..., metavar="DIR", help="Index directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but "
                             "loopback needs a token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    task: Optional[str] = typer.Option(None, "--task", help="Task file to run: the one the "
                                       "index was built from (required unless it ships with "
                                       "grass-index; `info` shows the recorded one)."),
    hf_model: Optional[Path] = hf_model_option(),
    data: Optional[Path] = data_option(),
    token: Optional[str] = typer.Option(None, "--token", envvar="GRASS_INDEX_TOKEN",
                                        show_envvar=True, help="Require this token on every "
                                        "request (Authorization: Bearer T, or ?token=T)."),
    max_k: int = typer.Option(100, "--max-k", min=1, help="Largest k a request may ask for."),
    max_body: int = typer.Option(8 << 20, "--max-body", min=1024, help="Largest request "
                                 "body in bytes."),
    batch_window_ms: float = typer.Option(2.0, "--batch-window-ms", min=0.0, help="How long "
                                          "a query waits for others to share its batch."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most queries per batch."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch/FAISS threads "
                                          "(default: all CPUs; 1 is often fastest for small "
                                          "models or a busy machine)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
) -> None:
    """Serve an index: JSON API (/api/query, /api/info, /healthz) and a page at /."""
    try:
        from grass_index.serve.app import serve
    except ImportError as e:
        fail(f"grass-index serve needs FastAPI and uvicorn ({e}); install them with "
             "pip install 'grass-index[serve]'")
    task = named_task(task, hf_model, data)
    serve(directory, host=host, port=port, task=task, token=token, max_k=max_k,
          max_body=max_body, batch_window_ms=batch_window_ms, max_batch=max_batch,
          threads=threads, access_log=access_log)


def register(app: typer.Typer) -> None:
    """Add the `serve` sub-command to the grass-index typer app."""
    app.command("serve")(errors(serve_command))
