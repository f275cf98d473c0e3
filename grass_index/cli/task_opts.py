"""What a command may run or open for an index, named by the user on its command line: a task
(``--task``) or, for an index built with ``--hf-model``, the model directory and data file
(``--hf-model DIR --data FILE``). The paths an index records are data: shown by `info`, opened
only when named here (grass_index/task.py ``task_for_index`` compares them with the record)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import fail


def hf_model_option():
    return typer.Option(None, "--hf-model", help="For an index built with --hf-model: the "
                        "same model directory (a recorded path is opened only when named).")


def data_option():
    return typer.Option(None, "--data", help="For an index built with --hf-model: the same "
                        "data file (checked against its recorded sha256).")


def named_task(task: Optional[str], hf_model: Optional[Path], data: Optional[Path]):
    """``task``, or the hf-lm reference of the named model and data paths."""
    if hf_model is None and data is None:
        return task
    if task is not None:
        fail("pass --task FILE, or --hf-model DIR with --data FILE, not both")
    if hf_model is None or data is None:
        fail("--hf-model DIR and --data FILE go together")
    from grass_index.tasks.hf_lm import named_ref

    return named_ref(hf_model, data)
