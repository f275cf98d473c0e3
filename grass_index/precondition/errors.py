"""The error type of preconditioning: bad damping or Hessian name, a Fisher or preconditioner
state that does not fit the layout, a singular F + λI."""
from __future__ import annotations

from ..errors import GrassIndexError


class PreconditionError(GrassIndexError, ValueError):
    """The preconditioner cannot be fitted or loaded; the message names the problem and fix."""
