"""Every eigenvalue of a symmetric float64 matrix, as cheaply as the installed LAPACK allows.

Damping "auto" (the default) needs the whole spectrum of each dense layer's Fisher (k × k, k up
to 4096 and more). scipy's ``eigvalsh`` reduces the matrix to tridiagonal form with Householder
reflections, half of whose flops are matrix-vector products (memory-bound): 4.6× the Cholesky
and inverse of the same matrix at k = 4096. LAPACK's two-stage reduction (full -> band with
matrix-matrix products, then band -> tridiagonal) gives the same eigenvalues (as backward
stable; they agree to ~1e-16 of the largest) in 2.5× (benchmarks/damping_cost.py,
docs/damping.md). scipy does not wrap it, but the OpenBLAS its wheels bundle exports it
(``LAPACKE_dsyevd_2stage``, 32-bit integers): it is called there through ctypes, once checked
against numpy on a small matrix; with any other LAPACK (a conda or system scipy) this falls
back to scipy's ``eigvalsh``.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import scipy.linalg

_COL_MAJOR = 102  # LAPACKE's LAPACK_COL_MAJOR
_two_stage = None  # the LAPACKE function once looked up; False when unavailable


def _lookup():
    """scipy's bundled OpenBLAS's LAPACKE_dsyevd_2stage, or False."""
    import scipy

    libs = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    # "libscipy_openblas-*" is the 32-bit-integer build scipy links (numpy's 64-bit one is
    # "libscipy_openblas64_-*", whose symbols take 64-bit integers: never matched here)
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas-*.so"))):
        try:
            fn = ctypes.CDLL(path).scipy_LAPACKE_dsyevd_2stage
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        a = np.random.default_rng(0).standard_normal((6, 6))
        a = a + a.T
        try:
            got = _call(fn, a.copy())
        except RuntimeError:
            continue
        if np.allclose(got, np.linalg.eigvalsh(a), rtol=1e-12, atol=1e-12):
            return fn
    return False


def _call(fn, a: np.ndarray) -> np.ndarray:
    """The eigenvalues (ascending) of a C-contiguous symmetric float64 ``a``, destroying it."""
    k = a.shape[0]
    w = np.empty(k, dtype=np.float64)
    info = fn(_COL_MAJOR, b"N", b"L", k, a.ctypes.data, k, w.ctypes.data)
    if info != 0:
        raise RuntimeError(f"dsyevd_2stage failed (info {info})")
    return w


def two_stage_available() -> bool:
    global _two_stage
    if _two_stage is None:
        _two_stage = _lookup()
    return _two_stage is not False


def eigenvalues(a: np.ndarray, *, two_stage: bool | None = None) -> np.ndarray:
    """Every eigenvalue of the symmetric matrix ``a`` (ascending, float64; ``a`` is left as it
    was). ``two_stage``: None uses LAPACK's two-stage reduction where available, False forces
    scipy's eigvalsh (the reference the tests compare with)."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape[0] >= 2 and two_stage is not False and two_stage_available():
        try:
            return _call(_two_stage, np.array(a, dtype=np.float64, order="C"))
        except RuntimeError:
            pass  # (not seen) scipy's routine below computes the same values
    return scipy.linalg.eigvalsh(a, check_finite=False)
