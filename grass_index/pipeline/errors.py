"""AttributionError lives with the index-directory format (grass_index/indexdir/errors.py);
kept importable from here for the build's modules."""
from ..indexdir.errors import AttributionError  # noqa: F401
