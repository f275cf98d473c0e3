"""The state codec: a state dict (of arrays, some of them strings) as one uint8 array (.npz
bytes), how preconditioners (persist.py) and Kronecker factors (ekfac.py) go into a store.
A leaf, so both can use it without importing each other."""
from __future__ import annotations

import io

import numpy as np


def state_to_array(state: dict) -> np.ndarray:
    """A preconditioner state (dict of arrays, some of them strings) as one uint8 array (.npz)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def state_from_array(arr) -> dict:
    with np.load(io.BytesIO(np.asarray(arr, dtype=np.uint8).tobytes()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
