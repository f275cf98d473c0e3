"""Task: any Hugging Face causal LM whose weights are on local disk, over the lines of a text file.

    export GRASS_INDEX_MODEL_PATH=/models/my-llama     # a save_pretrained() directory
    export GRASS_INDEX_TEXT_FILE=corpus.txt            # training data: one example per line
    export GRASS_INDEX_QUERY_FILE=questions.txt        # optional; default: the training lines
    grass-index build examples/hf_causal_lm.py --out runs/my-llama --layers 'model.layers.*'
    grass-index query runs/my-llama --task examples/hf_causal_lm.py --example 0  # top lines

A task file takes no command-line arguments, so the model path and data come from environment
variables (read when the functions are called, so the query/score commands must see the same
ones as the build; the index records the model and data hashes and refuses a mismatch):

    GRASS_INDEX_MODEL_PATH   directory with config.json + weights (required)
    GRASS_INDEX_TEXT_FILE    UTF-8 text, one training example per non-empty line (required)
    GRASS_INDEX_QUERY_FILE   UTF-8 text, one query per non-empty line (optional)
    GRASS_INDEX_MAX_LENGTH   truncate each example to this many tokens (default 128)

The same task without environment variables or a task file:

    grass-index build --hf-model /models/my-llama --data corpus.txt --out runs/my-llama
    grass-index query runs/my-llama --hf-model /models/my-llama --data corpus.txt --text "a question"

This file is a thin wrapper over that library task (grass_index/tasks/hf_lm.py: loading,
tokenizer or byte-level fallback, padding, the summed next-token loss). There is no train():
retraining a pretrained LM from scratch on subsets is not what LDS on this task would mean.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from grass_index.task import TaskError
from grass_index.tasks import hf_lm

ENV_MODEL = "GRASS_INDEX_MODEL_PATH"
ENV_TEXT = "GRASS_INDEX_TEXT_FILE"
ENV_QUERY = "GRASS_INDEX_QUERY_FILE"
ENV_MAX_LEN = "GRASS_INDEX_MAX_LENGTH"


class HFTaskError(TaskError):
    """The environment does not describe a usable model/data; the message says what to set."""


def _model_dir() -> Path:
    raw = os.environ.get(ENV_MODEL)
    if not raw:
        raise HFTaskError(f"{ENV_MODEL} is not set; export it to a local directory made by "
                          "save_pretrained() (config.json + weights), e.g. "
                          f"{ENV_MODEL}=/models/my-llama")
    p = Path(raw).expanduser()
    if not p.is_dir():
        raise HFTaskError(f"{ENV_MODEL}={raw} is not a directory; point it at a local model "
                          "directory (nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise HFTaskError(f"{ENV_MODEL}={raw} has no config.json; it must be a directory written "
                          "by model.save_pretrained(...)")
    return p


def _lines(env: str, required: bool) -> list[str] | None:
    raw = os.environ.get(env)
    if not raw:
        if required:
            raise HFTaskError(f"{env} is not set; export it to a UTF-8 text file with one "
                              f"example per line, e.g. {env}=corpus.txt")
        return None
    p = Path(raw).expanduser()
    if not p.is_file():
        raise HFTaskError(f"{env}={raw}: file not found")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise HFTaskError(f"{env}={raw} is not UTF-8 text ({e})") from e
    lines = [ln for ln in lines if ln]
    if not lines:
        raise HFTaskError(f"{env}={raw} has no non-empty lines")
    return lines


def _max_length() -> int:
    raw = os.environ.get(ENV_MAX_LEN, "128")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 2:
        raise HFTaskError(f"{ENV_MAX_LEN}={raw}: give an integer >= 2 (tokens per example)")
    return n


# ----------------------------------------------------------------------------- the task

def tokenizer():
    """The model directory's tokenizer, or the byte-level fallback."""
    try:
        return hf_lm.tokenizer_for(str(_model_dir().resolve()), f"{ENV_MODEL}=")
    except TaskError as e:
        raise HFTaskError(str(e)) from e


def _texts(lines: list[str]) -> hf_lm.TokenizedTexts:
    try:
        return hf_lm.TokenizedTexts(lines, tokenizer(), _max_length(), "line")
    except HFTaskError:
        raise
    except TaskError as e:
        raise HFTaskError(str(e)) from e


def train_data() -> hf_lm.TokenizedTexts:
    return _texts(_lines(ENV_TEXT, required=True))


def query_data() -> hf_lm.TokenizedTexts:
    q = _lines(ENV_QUERY, required=False)
    return _texts(q if q is not None else _lines(ENV_TEXT, required=True))


def collate(items):
    """Right-pad with the tokenizer's pad id: (input_ids [B, T], attention_mask [B, T])."""
    return hf_lm.collate_with(tokenizer().pad_token_id)(items)


loss = hf_lm.causal_lm_loss


def label(item) -> str:
    return tokenizer().decode(item)


def encode(text: str):
    """Token ids of typed text, like a train_data() item (lets `query --text` query text)."""
    return _texts([text])[0]


def model() -> nn.Module:
    path = _model_dir()
    try:
        return hf_lm.load_causal_lm(path, "float32", f"{ENV_MODEL}=")
    except TaskError as e:
        raise HFTaskError(str(e)) from e
