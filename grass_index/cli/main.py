"""The `grass-index` command (also `python -m grass_index`): a thin layer over the Python API
(the names ``import grass_index`` exports) and grass_index.fileio for writing its outputs.

Human output and progress go to stderr; ``--json`` writes one document to stdout. Every failure
is one readable line on stderr (the problem and the fix) and exit code 1. Each sub-command
lives in its own module and is wired here with ``register(app)``, in the order ``--help``
lists them.
"""
from __future__ import annotations

import logging
import sys

import typer

from . import (build_cmd, eval_cmd, info_cmd, living_cmd, query_cmd, selective_cmd,
               self_influence_cmd, serve_cmd, tune_cmd)

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Training-data attribution: which training examples made the model do this?")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details to stderr.")):
    """grass-index: build an attribution index once, then query it in milliseconds."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


for _module in (build_cmd, living_cmd, query_cmd, info_cmd, eval_cmd, selective_cmd, serve_cmd,
                self_influence_cmd, tune_cmd):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
