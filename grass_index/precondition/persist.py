"""A preconditioner in a store: each array of each layer's form (forms.py: a dense inverse, a
low-rank core, EK-FAC's eigenbases and eigenvalues) as its own store array — large ones become
.npy files beside the LMDB data, see grass_index/store/arrays.py — plus a small state array
written last, so a variant is complete exactly when its state exists. Reading also accepts the
older layouts (a dense ``inverse`` per layer; the whole state as one .npz byte array under
``precond/KEY``)."""
from __future__ import annotations

import numpy as np

from .forms import ARRAY_NAMES, FORMS
from .preconditioner import Preconditioner
from .state import state_from_array, state_to_array  # noqa: F401  (re-exported)

PREFIX = "precond/"


def _state_name(key: str) -> str:
    return f"{PREFIX}{key}/state"


def _array_name(key: str, entry: str) -> str:
    """``entry`` is a state-dict key ARRAY/LAYER (e.g. inverse/h.0.attn.c_attn)."""
    return f"{PREFIX}{key}/{entry}"


def _is_form_array(entry: str) -> bool:
    return entry.split("/", 1)[0] in ARRAY_NAMES and "/" in entry


def save_preconditioner(store, key: str, pre: Preconditioner) -> None:
    """Each layer's form arrays as their own arrays (no copy of the whole set), the state last."""
    small = {}
    for entry, value in pre.state_dict().items():
        if _is_form_array(entry):
            store.put_array(_array_name(key, entry), value)
        else:
            small[entry] = value
    store.put_array(_state_name(key), state_to_array(small))
    if store.has_array(f"{PREFIX}{key}"):  # the same variant in the older layout (a repair)
        store.delete_array(f"{PREFIX}{key}")


def has_preconditioner(store, key: str) -> bool:
    return store.has_array(_state_name(key)) or store.has_array(f"{PREFIX}{key}")


def load_preconditioner(store, key: str, layout: dict, *, mapped: bool = False,
                        rows=None, blocks=None) -> Preconditioner:
    """The stored variant ``key``; KeyError when absent, ValueError/StoreError when damaged.

    ``mapped``: large arrays are memory-mapped and checked cheaply (size, header, shape,
    dtype) instead of read and checksummed whole — a query's way; ``verify`` and pass 2 read
    them checked. ``rows`` returns the [n, K] stored sketches the low-rank layers apply
    through (default: read from ``store`` on first need, so it must still be open then);
    ``blocks`` streams them (``Preconditioner``'s, for a query's small batches)."""
    if rows is None:
        rows = lambda: store.get_rows(np.arange(store.num_rows))  # noqa: E731
    if store.has_array(f"{PREFIX}{key}"):  # older layout: one .npz byte array
        return Preconditioner.from_state_dict(
            state_from_array(store.get_array(f"{PREFIX}{key}")), layout, rows=rows,
            blocks=blocks)
    state = state_from_array(store.get_array(_state_name(key)))
    if str(np.asarray(state.get("hessian"))) != "identity":
        for name in layout:
            form = str(np.asarray(state.get(f"form/{name}", "dense")))
            for array in getattr(FORMS.get(form), "names", ()):
                entry = f"{array}/{name}"
                state[entry] = store.get_array(_array_name(key, entry), mapped=mapped)
    return Preconditioner.from_state_dict(state, layout, rows=rows, blocks=blocks)


def stale_preconditioner_arrays(names, key: str) -> list[str]:
    """Arrays of every variant but ``key``, states first (a half-deleted variant is then never
    taken for a complete one)."""
    keep = (f"{PREFIX}{key}", _state_name(key))
    stale = [n for n in names if n.startswith(PREFIX) and n not in keep
             and not n.startswith(f"{PREFIX}{key}/")]
    return sorted(stale, key=lambda n: not n.endswith("/state"))
