"""The error type of preconditioning: bad damping or Hessian name, a Fisher or preconditioner
state that does not fit the layout, a singular F + λI."""
from __future__ import annotations

from ..errors import GrassIndexError


class PreconditionError(GrassIndexError, ValueError):
    """The preconditioner cannot be fitted or loaded; the message names the problem and fix."""


class DampingError(PreconditionError):
    """The damping did not fit these gradients (F + λI singular, or preconditioned vectors
    that float32 cannot hold). ``needs`` says which way to move it: "larger" or "smaller".
    Pass 2 adds the exact command that re-runs it with another damping (pass 1 is kept)."""

    def __init__(self, message: str, needs: str):
        super().__init__(message)
        self.needs = needs
