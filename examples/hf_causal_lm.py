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

Nothing is downloaded: the model is loaded with AutoModelForCausalLM.from_pretrained(path,
local_files_only=True) in float32, and the tokenizer from the same directory when it has
tokenizer files; otherwise a byte-level fallback is used (token id = UTF-8 byte, which needs a
vocabulary of at least 256). The loss is the next-token cross-entropy summed over each line's
real tokens (padding masked out), one value per line. There is no train(): retraining a
pretrained LM from scratch on subsets is not what LDS on this task would mean.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENV_MODEL = "GRASS_INDEX_MODEL_PATH"
ENV_TEXT = "GRASS_INDEX_TEXT_FILE"
ENV_QUERY = "GRASS_INDEX_QUERY_FILE"
ENV_MAX_LEN = "GRASS_INDEX_MAX_LENGTH"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model")


class HFTaskError(ValueError):
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


# ----------------------------------------------------------------------------- tokenizer

class ByteTokenizer:
    """Fallback when the model directory has no tokenizer: token id = UTF-8 byte."""

    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, tok):
        self.tok = tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


@functools.lru_cache(maxsize=4)
def _tokenizer_for(path: str):
    p = Path(path)
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            return _HFTokenizer(AutoTokenizer.from_pretrained(p, local_files_only=True))
        except Exception as e:
            raise HFTaskError(f"{ENV_MODEL}={path}: the tokenizer files there cannot be loaded "
                              f"({type(e).__name__}: {e}); fix or remove them to use the "
                              "byte-level fallback") from e
    return ByteTokenizer()


def tokenizer():
    """The model directory's tokenizer, or the byte-level fallback."""
    return _tokenizer_for(str(_model_dir().resolve()))


def _vocab_size(path: Path) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    v = getattr(cfg, "vocab_size", None)
    if v is None and hasattr(cfg, "get_text_config"):
        v = getattr(cfg.get_text_config(), "vocab_size", None)
    return v


# ----------------------------------------------------------------------------- data

class TextLines(torch.utils.data.Dataset):
    """Item i: LongTensor of the token ids of line i (truncated to the max length)."""

    def __init__(self, lines: list[str]):
        tok, n = tokenizer(), _max_length()
        if isinstance(tok, ByteTokenizer):
            v = _vocab_size(_model_dir())
            if v is not None and v < 256:
                raise HFTaskError(f"{ENV_MODEL}={os.environ[ENV_MODEL]} has no tokenizer files "
                                  f"and a vocabulary of {v} < 256, too small for the byte-level "
                                  "fallback; save the model's tokenizer into that directory "
                                  "(tokenizer.save_pretrained(path))")
        self.lines = lines
        self._items = []
        for i, ln in enumerate(lines):
            ids = tok.encode(ln)[:n]
            if len(ids) < 2:
                raise HFTaskError(f"line {i + 1} ({ln!r}) has fewer than 2 tokens; a causal LM "
                                  "loss needs at least one predicted token")
            self._items.append(torch.tensor(ids, dtype=torch.long))

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


def train_data() -> TextLines:
    return TextLines(_lines(ENV_TEXT, required=True))


def query_data() -> TextLines:
    q = _lines(ENV_QUERY, required=False)
    return TextLines(q if q is not None else _lines(ENV_TEXT, required=True))


def collate(items):
    """Right-pad with the tokenizer's pad id: (input_ids [B, T], attention_mask [B, T])."""
    pad = tokenizer().pad_token_id
    T = max(len(x) for x in items)
    ids = torch.full((len(items), T), pad, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for r, x in enumerate(items):
        ids[r, :len(x)] = x
        mask[r, :len(x)] = 1
    return ids, mask


def loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy summed over each sequence's real tokens: Tensor[B]."""
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = ids[:, 1:]
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              tgt.reshape(-1), reduction="none").view_as(tgt)
    return (per_tok * mask[:, 1:].to(per_tok.dtype)).sum(dim=1)


def label(item) -> str:
    return tokenizer().decode(item)


def encode(text: str) -> torch.Tensor:
    """Token ids of typed text, like a train_data() item (lets `grass-index serve` query text)."""
    ids = tokenizer().encode(text)[:_max_length()]
    if len(ids) < 2:
        raise HFTaskError(f"{text!r} has fewer than 2 tokens; a causal LM loss needs at least "
                          "one predicted token")
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model

def model() -> nn.Module:
    from transformers import AutoModelForCausalLM

    path = _model_dir()
    try:
        m = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise HFTaskError(f"{ENV_MODEL}={path}: cannot load a causal LM from it "
                          f"({type(e).__name__}: {e})") from e
    return m.eval()
