"""Which FAISS: the ``faiss`` module comes from exactly one of two wheels, faiss-cpu
(``pip install 'grass-index[cpu]'``) or faiss-gpu (``'grass-index[gpu]'``, which also runs CPU
indexes and searches on a GPU when there is one, see gpu.py). Neither is a core dependency, as
both install the same module; this stage says so in one line when neither is there."""
from __future__ import annotations

from ..errors import GrassIndexError

INSTALL_HINT = ("FAISS is not installed (the index stage needs it): install grass-index[cpu] "
                "or grass-index[gpu], e.g. pip install -e '.[cpu]'")


class FaissNotInstalledError(GrassIndexError, ImportError):
    """Neither faiss-cpu nor faiss-gpu is installed."""


try:
    import faiss  # noqa: F401  (re-exported)
except ImportError as e:
    raise FaissNotInstalledError(f"{INSTALL_HINT} ({e})") from e
