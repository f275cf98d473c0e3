"""The grass-index command line (installed as grass_index.cli)."""
from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point (``grass-index``, ``python -m grass_index``): the command,
    or one line and exit 1 when it cannot even load, e.g. with neither FAISS wheel installed
    (``pip install 'grass-index[cpu]'`` or ``'grass-index[gpu]'``)."""
    from ..errors import GrassIndexError

    try:
        from .main import main as run
    except GrassIndexError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(1) from None
    run()
