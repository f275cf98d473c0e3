"""The default task, kept at this path for `grass-index build examples/digits.py` and scripts
that load it by file: the code lives in grass_index/examples/digits.py (shipped with the
package, so the default task works from any install)."""
from grass_index.examples.digits import *  # noqa: F401,F403
from grass_index.examples.digits import _arrays, _cache_path  # noqa: F401
