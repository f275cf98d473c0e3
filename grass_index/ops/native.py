"""Loads the optional compiled kernels (grass_index._C) and reports which are active.

The ops are always defined (in Python, ops/library.py) with a pure-torch fallback, so a
missing or broken build only costs speed, never correctness. Env switches:
  GRASS_INDEX_DISABLE_NATIVE=1  never load the extension (tests run both ways)
  GRASS_INDEX_REQUIRE_NATIVE=1  fail loudly instead of falling back (used in CI)
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("grass_index")

_native_error: str | None = None
_loaded = False


def _build_info() -> dict:
    path = Path(__file__).resolve().parent.parent / "_build_info.json"  # beside grass_index/_C
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load() -> None:
    """Import grass_index._C once; its static initialisers register the CPU/CUDA kernels."""
    global _native_error, _loaded
    if _loaded or _native_error is not None:
        return
    if os.environ.get("GRASS_INDEX_DISABLE_NATIVE", "0") == "1":
        _native_error = "disabled by GRASS_INDEX_DISABLE_NATIVE=1"
        return
    try:
        from .. import _C  # noqa: F401
        _loaded = True
    except (ImportError, OSError) as e:
        info = _build_info()
        built = f" (built for torch {info.get('torch')}, cuda {info.get('cuda')})" if info else ""
        _native_error = f"{type(e).__name__}: {e}{built}"
        if os.environ.get("GRASS_INDEX_REQUIRE_NATIVE", "0") == "1":
            raise ImportError(
                f"grass_index native kernels failed to load: {_native_error}. Rebuild with "
                "`pip install --no-build-isolation -e .` against the installed torch, or unset "
                "GRASS_INDEX_REQUIRE_NATIVE to use the pure-torch fallback."
            ) from e
        log.warning("grass_index: native kernels unavailable, using pure-torch fallback: %s", _native_error)


def _has_kernel(op: str, key: str) -> bool:
    import torch

    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"grass_index::{op}", key))


def native_status() -> dict:
    """Which implementation each op runs on each device, and why.

    Example: {"loaded": True, "error": None, "build": {...},
              "kernels": {"sjlt": {"CPU": "native", "CUDA": "fallback"}, ...}}
    """
    kernels = {
        op: {key: ("native" if _has_kernel(op, key) else "fallback") for key in ("CPU", "CUDA")}
        for op in ("sjlt", "mask")
    }
    return {"loaded": _loaded, "error": _native_error, "build": _build_info(), "kernels": kernels}
