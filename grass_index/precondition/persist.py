"""A preconditioner in a store: one array per layer's inverse (large arrays become .npy files
beside the LMDB data, see grass_index/store/arrays.py) plus a small state array written last,
so a variant is complete exactly when its state exists. Reading also accepts the older layout
(the whole state as one .npz byte array under ``precond/KEY``)."""
from __future__ import annotations

import numpy as np

from .preconditioner import Preconditioner
from .state import state_from_array, state_to_array  # noqa: F401  (re-exported)

PREFIX = "precond/"


def _state_name(key: str) -> str:
    return f"{PREFIX}{key}/state"


def _inverse_name(key: str, layer: str) -> str:
    return f"{PREFIX}{key}/inverse/{layer}"


def save_preconditioner(store, key: str, pre: Preconditioner) -> None:
    """Each layer's inverse as its own array (no copy of the whole set), the state last."""
    small = {}
    for name, value in pre.state_dict().items():
        if name.startswith("inverse/"):
            store.put_array(_inverse_name(key, name[len("inverse/"):]), value)
        else:
            small[name] = value
    store.put_array(_state_name(key), state_to_array(small))
    if store.has_array(f"{PREFIX}{key}"):  # the same variant in the older layout (a repair)
        store.delete_array(f"{PREFIX}{key}")


def has_preconditioner(store, key: str) -> bool:
    return store.has_array(_state_name(key)) or store.has_array(f"{PREFIX}{key}")


def load_preconditioner(store, key: str, layout: dict) -> Preconditioner:
    """The stored variant ``key``; KeyError when absent, ValueError/StoreError when damaged."""
    if store.has_array(f"{PREFIX}{key}"):  # older layout: one .npz byte array
        return Preconditioner.from_state_dict(state_from_array(store.get_array(f"{PREFIX}{key}")), layout)
    state = state_from_array(store.get_array(_state_name(key)))
    if str(np.asarray(state.get("hessian"))) != "identity":
        for name in layout:
            state[f"inverse/{name}"] = store.get_array(_inverse_name(key, name))
    return Preconditioner.from_state_dict(state, layout)


def stale_preconditioner_arrays(names, key: str) -> list[str]:
    """Arrays of every variant but ``key``, states first (a half-deleted variant is then never
    taken for a complete one)."""
    keep = (f"{PREFIX}{key}", _state_name(key))
    stale = [n for n in names if n.startswith(PREFIX) and n not in keep
             and not n.startswith(f"{PREFIX}{key}/")]
    return sorted(stale, key=lambda n: not n.endswith("/state"))
