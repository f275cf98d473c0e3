"""A task for any Hugging Face causal LM on local disk over a text corpus, built in code:

    t = hf_lm_task("/models/gpt2", "corpus.txt")                 # one example per line
    t = hf_lm_task(model_dir, "data.jsonl", text_field="text")    # JSON lines
    t = hf_lm_task(model_dir, "ds_dir", text_field="text")        # datasets.save_to_disk dir

What `grass-index build --hf-model DIR --data FILE` uses. The index records a reference
``hf-lm:{json of these arguments}`` and the sha256 of the data file. Those recorded paths are
data (anyone may edit an index directory): they are shown, and a later command opens them only
when the user names them again (``--hf-model DIR --data FILE``), with the same paths and the
same data sha256 (:func:`task_for_recorded`); the other arguments (text field, length, dtype)
come from the record.

Nothing is downloaded: the model is loaded with ``from_pretrained(dir, local_files_only=True)``
in ``dtype``; the tokenizer from the same directory when it has tokenizer files, else a byte
fallback (token id = UTF-8 byte; needs a vocabulary of at least 256). The loss is the
next-token cross-entropy summed over each example's real tokens (padding masked), in float32.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shlex
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import option, spelled
from ..task import Task, TaskError

REF_PREFIX = "hf-lm:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ByteTokenizer:
    """Fallback when the model directory has no tokenizer: token id = UTF-8 byte."""

    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, tok):
        self.tok = tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One tokenizer call for many texts (the same ids as ``encode`` of each)."""
        return [list(x) for x in self.tok(texts)["input_ids"]]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _model_arg(what: str | None = None) -> str:
    """``what`` names the model directory in messages; by default as the caller names it."""
    return what or spelled("--hf-model", "model_dir")


def _data_arg(what: str | None = None) -> str:
    """``what`` names the data file in messages; by default as the caller names it."""
    return what or option("data")


def check_model_dir(path, what: str | None = None) -> Path:
    what = _model_arg(what)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise TaskError(f"{what} {path} is not a directory; point it at a local model "
                        "directory written by save_pretrained() (nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise TaskError(f"{what} {path} has no config.json; it must be a directory written by "
                        "model.save_pretrained(...)")
    return p


@functools.lru_cache(maxsize=4)
def model_config(path: str, what: str | None = None):
    """The directory's transformers config, or one error line saying what is wrong with it
    (e.g. no ``model_type``: transformers cannot tell which architecture to build)."""
    from transformers import AutoConfig

    what = _model_arg(what)
    try:
        return AutoConfig.from_pretrained(Path(path), local_files_only=True)
    except Exception as e:
        hint = ("; config.json must name the architecture with \"model_type\" (e.g. \"gpt2\"), "
                "as save_pretrained() writes it" if "model_type" in str(e) else "")
        raise TaskError(f"{what} {path}: its config.json cannot be read as a transformers "
                        f"config ({type(e).__name__}: {str(e).splitlines()[0][:200]}){hint}"
                        ) from None


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


DEFAULT_MAX_LENGTH = 128


def check_context(path: str, max_length: int | None, what: str | None = None) -> int:
    """``max_length`` (None: DEFAULT_MAX_LENGTH, or the model's context when shorter), checked
    to fit the model's context: positions beyond it have no embedding, and the forward pass
    would fail with an IndexError deep in the model."""
    cfg = model_config(path, what)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    context = next((getattr(text, k) for k in CONTEXT_KEYS
                    if isinstance(getattr(text, k, None), int)), None)
    if max_length is None:
        return DEFAULT_MAX_LENGTH if context is None else min(DEFAULT_MAX_LENGTH, context)
    if context is not None and max_length > context:
        flag = spelled(f"--max-length {max_length}", f"max_length={max_length}")
        fix = spelled(f"--max-length {context}", f"max_length={context}")
        raise TaskError(f"{flag} is longer than the context of the model in {path} ({context} "
                        f"tokens, config.json); give {fix} or less")
    return max_length


@functools.lru_cache(maxsize=4)
def tokenizer_for(path: str, what: str | None = None):
    """The directory's tokenizer, or the byte fallback (checked against the vocabulary)."""
    what = _model_arg(what)
    p = Path(path)
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            return _HFTokenizer(AutoTokenizer.from_pretrained(p, local_files_only=True))
        except Exception as e:
            raise TaskError(f"{what} {path}: the tokenizer files there cannot be loaded "
                            f"({type(e).__name__}: {e}); fix or remove them to use the "
                            "byte-level fallback") from e
    cfg = model_config(str(p), what)
    v = getattr(cfg, "vocab_size", None)
    if v is None and hasattr(cfg, "get_text_config"):
        v = getattr(cfg.get_text_config(), "vocab_size", None)
    if v is not None and v < 256:
        raise TaskError(f"{what} {path} has no tokenizer files and a vocabulary of {v} < 256, "
                        "too small for the byte-level fallback; save the model's tokenizer "
                        "into that directory (tokenizer.save_pretrained(path))")
    return ByteTokenizer()


# ----------------------------------------------------------------------------- data

def read_texts(path, text_field: str | None = None, what: str | None = None) -> list[str]:
    """The examples of a .txt (one per non-empty line), .jsonl (``text_field`` of each line) or
    ``datasets.save_to_disk`` directory; one clear error line for anything else."""
    what = _data_arg(what)
    p = Path(path).expanduser()
    if p.is_dir():
        return _dataset_texts(p, text_field or "text", what)
    texts = list(iter_texts(p, text_field, what))
    if not texts:
        raise TaskError(f"{what} {path} is empty (no non-empty lines); give one example per line")
    return texts


def iter_texts(p: Path, text_field: str | None = None, what: str | None = None):
    """The examples of a .txt or .jsonl file, stripped, empty ones skipped, read line by line
    (the same lines as ``str.splitlines`` of the whole file gives)."""
    what = _data_arg(what)
    if not p.is_file():
        raise TaskError(f"{what} {p}: file not found")
    field = text_field or "text" if p.suffix == ".jsonl" or text_field is not None else None
    try:
        with open(p, encoding="utf-8") as f:
            i = 0
            for physical in f:
                for ln in physical.splitlines():
                    i += 1
                    ln = ln.strip()
                    text = ln if field is None or not ln else _json_text(ln, field, i, p, what)
                    if text:
                        yield text
    except UnicodeDecodeError as e:
        raise TaskError(f"{what} {p} is not UTF-8 text ({e}); convert it to UTF-8") from None


def _json_text(ln: str, field: str, i: int, path, what: str) -> str:
    try:
        obj = json.loads(ln)
    except json.JSONDecodeError as e:
        raise TaskError(f"{what} {path} line {i} is not JSON ({e.msg}); give one JSON "
                        "object per line") from None
    if not isinstance(obj, dict) or field not in obj:
        raise TaskError(f"{what} {path} line {i} has no field {field!r}; name the text "
                        f"field with {option('text_field')}")
    if not isinstance(obj[field], str):
        raise TaskError(f"{what} {path} line {i}: field {field!r} is "
                        f"{type(obj[field]).__name__}, not text")
    return obj[field].strip()


def _dataset_texts(p: Path, field: str, what: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise TaskError(f"{what} {p} is a directory, read as a datasets.save_to_disk dataset, "
                        "but the `datasets` package is not installed; pip install datasets or "
                        "give a .txt/.jsonl file") from None
    ds = _load_from_disk(datasets, p, field, what)
    texts = [str(t).strip() for t in ds[field] if str(t).strip()]
    if not texts:
        raise TaskError(f"{what} {p} is empty (no non-empty {field!r} values)")
    return texts


def _load_from_disk(datasets, p: Path, field: str, what: str):
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise TaskError(f"{what} {p} is not a datasets.save_to_disk directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise TaskError(f"{what} {p} holds splits {list(ds)} but no 'train'; save one split")
        ds = ds["train"]
    if field not in ds.column_names:
        raise TaskError(f"{what} {p} has no column {field!r} (columns: {ds.column_names}); name "
                        f"the text column with {option('text_field')}")
    return ds


class ArrowTokens(torch.utils.data.Dataset):
    """Item i: LongTensor of the token ids of example i, read from a memory-mapped Arrow table
    (``datasets``): the corpus is streamed from its file into Arrow and tokenized in batches,
    so it never has to fit in a Python list, and DataLoader workers share the map. The items
    equal :class:`TokenizedTexts`' for the same file, tokenizer and max_length.

    The Arrow files live in a temporary folder of this object's lifetime (fresh fingerprints,
    never ``datasets``' shared cache): an edited corpus or another tokenizer can never be
    served from a stale cache."""

    BATCH = 1000  # texts per tokenizer call

    def __init__(self, path: Path, text_field: str | None, tok, max_length: int,
                 what: str | None = None):
        import tempfile

        import datasets

        what = _data_arg(what)
        self._tmp = tempfile.TemporaryDirectory(prefix="grass-index-arrow-")
        texts = _arrow_texts(datasets, Path(path), text_field, what, self._tmp.name)
        if len(texts) == 0:
            raise TaskError(f"{what} {path} is empty (no non-empty lines); give one example "
                            "per line")

        def tokenize(batch, idx):
            ids = [x[:max_length] for x in tok.encode_batch(batch["text"])]
            for i, x, t in zip(idx, ids, batch["text"]):
                if len(x) < 2:
                    raise TaskError(f"{what}: example {i + 1} ({t!r}) has fewer than 2 "
                                    "tokens; a causal LM loss needs at least one predicted "
                                    "token")
            return {"input_ids": ids}
        with _quiet(datasets):
            self.ds = texts.map(tokenize, batched=True, batch_size=self.BATCH, with_indices=True,
                                remove_columns=["text"], **_fresh(self._tmp.name, "tokens"))
        self.ds = self.ds.with_format("torch")

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[int(i)]["input_ids"].long()


def _fresh(folder: str, name: str) -> dict:
    """map/filter arguments that write a new Arrow file in ``folder`` (no shared cache)."""
    import uuid

    return dict(cache_file_name=str(Path(folder) / f"{name}.arrow"),
                new_fingerprint=uuid.uuid4().hex)


def _arrow_texts(datasets, path: Path, text_field: str | None, what: str, folder: str):
    """The stripped, non-empty texts of a file or save_to_disk directory as a one-column
    ("text") Arrow dataset written in ``folder``. A file is streamed into it by
    :func:`iter_texts`, so every bad line is the same one error line as without ``datasets``."""
    import uuid

    if path.is_dir():
        field = text_field or "text"
        ds = _load_from_disk(datasets, path, field, what)
        with _quiet(datasets):
            ds = ds.select_columns([field]).map(
                lambda b: {"text": [str(t).strip() for t in b[field]]}, batched=True,
                remove_columns=[field] if field != "text" else None, **_fresh(folder, "texts"))
            return ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True,
                             **_fresh(folder, "kept"))
    if next(iter_texts(path, text_field, what), None) is None:  # (file not found, too)
        raise TaskError(f"{what} {path} is empty (no non-empty lines); give one example per line")
    try:
        with _quiet(datasets):
            return datasets.Dataset.from_generator(
                _text_rows, gen_kwargs=dict(path=str(path), text_field=text_field, what=what),
                cache_dir=folder, fingerprint=uuid.uuid4().hex)
    except Exception as e:  # the generator's TaskError, wrapped by datasets
        cause = e
        while cause is not None and not isinstance(cause, TaskError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or TaskError(f"{what} {path}: cannot read it into Arrow ({e})")) from None


def _text_rows(path: str, text_field, what: str):
    for text in iter_texts(Path(path), text_field, what):
        yield {"text": text}


class _quiet:
    """No progress bars from ``datasets`` (stderr is for our progress)."""

    def __init__(self, datasets):
        self.d = datasets

    def __enter__(self):
        self.was = self.d.utils.are_progress_bars_disabled()
        self.d.utils.disable_progress_bars()

    def __exit__(self, *exc):
        if not self.was:
            self.d.utils.enable_progress_bars()


def ref_sha256(ref: str) -> str | None:
    """:func:`data_sha256` of the files a reference the user gave names (task.task_record)."""
    args = ref_args(ref)
    return data_sha256(args["data"], args.get("query"))


def data_sha256(data, query=None) -> str | None:
    """The sha256 over the data file's (and the query file's) bytes; None for a datasets
    directory (its examples are fingerprinted in the build record, ``data_hash``)."""
    paths = [Path(data)] + ([Path(query)] if query is not None else [])
    if not all(p.is_file() for p in paths):
        return None
    h = hashlib.sha256()
    for p in paths:
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class TokenizedTexts(torch.utils.data.Dataset):
    """Item i: LongTensor of the token ids of text i (truncated to ``max_length``)."""

    def __init__(self, texts: list[str], tok, max_length: int, what: str | None = None):
        what = _data_arg(what)
        self.texts, self._items = texts, []
        for i, t in enumerate(texts):
            ids = tok.encode(t)[:max_length]
            if len(ids) < 2:
                raise TaskError(f"{what}: example {i + 1} ({t!r}) has fewer than 2 tokens; a "
                                "causal LM loss needs at least one predicted token")
            self._items.append(torch.tensor(ids, dtype=torch.long))

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


def collate_with(pad: int):
    """Right-pad with ``pad``: (input_ids [B, T], attention_mask [B, T])."""
    def collate(items):
        T = max(len(x) for x in items)
        ids = torch.full((len(items), T), pad, dtype=torch.long)
        mask = torch.zeros((len(items), T), dtype=torch.long)
        for r, x in enumerate(items):
            ids[r, :len(x)] = x
            mask[r, :len(x)] = 1
        return ids, mask
    return collate


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy summed over each sequence's real tokens: Tensor[B]."""
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = ids[:, 1:]
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              tgt.reshape(-1), reduction="none").view_as(tgt)
    return (per_tok * mask[:, 1:].to(per_tok.dtype)).sum(dim=1)


def load_causal_lm(path: Path, dtype: str = "float32", what: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    what = _model_arg(what)
    try:
        m = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                 dtype=DTYPES[dtype])
    except Exception as e:
        raise TaskError(f"{what} {path}: cannot load a causal LM from it "
                        f"({type(e).__name__}: {e})") from e
    return m.eval()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def has_weights(path) -> bool:
    """Whether a model directory holds weight files (else only its config can be used)."""
    return any(f.name.endswith(WEIGHT_SUFFIXES) for f in Path(path).iterdir() if f.is_file())


def meta_causal_lm(path, dtype: str = "float32", what: str | None = None) -> nn.Module:
    """The causal LM of ``path``'s config.json on the meta device: every parameter's shape and
    dtype, no storage and no weights read — what `grass-index plan` prices a model from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    what = _model_arg(what)
    if dtype not in DTYPES:
        raise TaskError(f"{option('dtype', dtype)}: use one of {', '.join(DTYPES)}")
    try:
        cfg = AutoConfig.from_pretrained(check_model_dir(path, what), local_files_only=True)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    except TaskError:
        raise
    except Exception as e:
        raise TaskError(f"{what} {path}: cannot build a causal LM from its config.json "
                        f"({type(e).__name__}: {e})") from e
    return m.eval()


# ----------------------------------------------------------------------------- the task

class HFCausalLM:
    """The functions of a task file, as an object (what :class:`grass_index.task.Task` wraps)."""

    def __init__(self, model_dir, data, *, text_field: str | None = None,
                 max_length: int | None = None,
                 dtype: str = "float32", query_data=None):
        if dtype not in DTYPES:
            raise TaskError(f"{option('dtype', dtype)}: use one of {', '.join(DTYPES)}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise TaskError(f"{option('max_length', max_length)}: give an integer >= 2 (tokens "
                            "per example)")
        if text_field is not None and not isinstance(text_field, str):
            raise TaskError(f"{option('text_field', text_field)}: give the name of a text "
                            "field")
        self.model_dir = check_model_dir(model_dir).resolve()
        self.data_path = Path(data).expanduser().resolve()
        self.query_path = None if query_data is None else Path(query_data).expanduser().resolve()
        model_config(str(self.model_dir))  # readable, and names its architecture
        max_length = check_context(str(self.model_dir), max_length)
        self.unnamed_query = None  # a query file the index records but the user did not name
        self.text_field, self.max_length, self.dtype = text_field, max_length, dtype
        self.tok = tokenizer_for(str(self.model_dir))
        self.collate = collate_with(self.tok.pad_token_id)
        self._train = None

    def ref(self) -> str:
        args = dict(model=str(self.model_dir), data=str(self.data_path),
                    text_field=self.text_field, max_length=self.max_length, dtype=self.dtype)
        if self.query_path is not None:
            args["query"] = str(self.query_path)
        return REF_PREFIX + json.dumps(args, sort_keys=True)

    def model(self) -> nn.Module:
        return load_causal_lm(self.model_dir, self.dtype)

    def train_data(self):
        """Memory-mapped Arrow (:class:`ArrowTokens`) when ``datasets`` is installed, else
        the texts tokenized into a list (:class:`TokenizedTexts`): the same items either way."""
        if self._train is None:
            try:
                import datasets  # noqa: F401
            except ImportError:
                self._train = TokenizedTexts(read_texts(self.data_path, self.text_field),
                                             self.tok, self.max_length)
            else:
                self._train = ArrowTokens(self.data_path, self.text_field, self.tok,
                                          self.max_length)
        return self._train

    def sha256(self) -> str | None:
        """What an index records to tell that a file named later holds the same examples."""
        return data_sha256(self.data_path, self.query_path)

    def query_data(self) -> TokenizedTexts:
        if self.unnamed_query is not None:
            raise TaskError(f"the index records query data {self.unnamed_query}, a path read "
                            "from the index directory, which is opened only when you name it: "
                            "pass hf_lm_task(..., query_data=PATH), or query by "
                            + spelled("--text", "text (task.encode)")
                            + " or ids of the training data")
        if self.query_path is None:
            return self.train_data()
        return TokenizedTexts(read_texts(self.query_path, self.text_field, "query_data"),
                              self.tok, self.max_length, "query_data")

    def encode(self, text: str) -> torch.Tensor:
        """A query example from raw text (``query --text``)."""
        return TokenizedTexts([text], self.tok, self.max_length, option("text"))[0]

    @staticmethod
    def loss(model, batch) -> torch.Tensor:
        return causal_lm_loss(model, batch)

    def label(self, item) -> str:
        return self.tok.decode(item)


def hf_lm_task(model_dir, data, *, text_field: str | None = None, max_length: int | None = None,
               dtype: str = "float32", query_data=None) -> Task:
    """A :class:`Task` for a local causal LM over a text corpus (see the module docstring)."""
    src = HFCausalLM(model_dir, data, text_field=text_field, max_length=max_length, dtype=dtype,
                     query_data=query_data)
    fns = dict(model=src.model, train_data=src.train_data, query_data=src.query_data,
               loss=src.loss, collate=src.collate, label=src.label, encode=src.encode)
    return Task(ref=src.ref(), source=src, _fns=fns, sha256=src.sha256())


def ref_args(ref: str) -> dict:
    """The arguments of an ``hf-lm:{...}`` reference (checked to be a JSON object)."""
    try:
        args = json.loads(ref[len(REF_PREFIX):])
    except ValueError as e:
        raise TaskError(f"task reference {ref[:200]!r} is not a valid hf-lm reference ({e})") \
            from None
    if not isinstance(args, dict) or not isinstance(args.get("model"), str) \
            or not isinstance(args.get("data"), str):
        raise TaskError(f"task reference {ref[:200]!r} is not a valid hf-lm reference (a JSON "
                        "object with the 'model' and 'data' paths)")
    return args


def task_flags(ref: str) -> str:
    """The flags that name the task of ``ref`` on a command line (``--hf-model DIR --data
    FILE`` and the recorded text field, max length and dtype), shell-quoted; in Python the
    ``task=`` argument."""
    args = ref_args(ref)
    return spelled(shlex.join(
        ["--hf-model", args["model"], "--data", args["data"]]
        + (["--text-field", str(args["text_field"])] if args.get("text_field") else [])
        + (["--max-length", str(args["max_length"])] if args.get("max_length") else [])
        + (["--dtype", str(args["dtype"])] if args.get("dtype") not in (None, "float32")
           else [])), f"task={ref!r}")


def named_ref(model_dir, data) -> str:
    """The reference for the paths a user names on a command line (``--hf-model DIR --data
    FILE``), resolved; :func:`task_for_recorded` completes it from the index's record."""
    return REF_PREFIX + json.dumps(dict(model=str(Path(model_dir).expanduser().resolve()),
                                        data=str(Path(data).expanduser().resolve())),
                                   sort_keys=True)


def task_from_ref(ref: str) -> Task:
    """The task a reference the user gave (``hf-lm:{...}``) describes."""
    args = ref_args(ref)
    try:
        return hf_lm_task(args["model"], args["data"], text_field=args.get("text_field"),
                          max_length=int(args.get("max_length", 128)),
                          dtype=args.get("dtype", "float32"), query_data=args.get("query"))
    except (ValueError, TypeError) as e:
        raise TaskError(f"task reference {ref[:200]!r} is not a valid hf-lm reference ({e})") \
            from None


def task_for_recorded(given: str, recorded: str, sha256: str | None) -> Task:
    """The task for an index built with ``--hf-model``, from the paths the user named
    (``given``, an hf-lm reference): they must be the recorded model directory and data file,
    and the data must still hash to the recorded sha256. The recorded text field, length and
    dtype are used as recorded (validated); a recorded query file is not opened unless named."""
    from ..untrusted import safe_text

    want, got = ref_args(recorded), ref_args(given)
    for key, flag in (("model", _model_arg()), ("data", _data_arg())):
        named = str(Path(got[key]).expanduser().resolve())
        if named != want[key]:
            raise TaskError(f"{flag} {safe_text(named)} is not the {key} path the index was "
                            f"built with ({safe_text(want[key])}); name that one (an index is "
                            "queried with the model and data it was built from)")
    args = {k: v for k, v in want.items() if k != "query"}
    args.update(model=got["model"], data=got["data"])
    if "query" in got:
        args["query"] = got["query"]
    t = task_from_ref(REF_PREFIX + json.dumps(args, sort_keys=True))
    if "query" in want and "query" not in got:
        t.source.unnamed_query = safe_text(want["query"])
    if sha256 is not None and t.sha256 != sha256:
        raise TaskError(f"{_data_arg()} {safe_text(got['data'])} has CHANGED since the index was "
                        f"built (sha256 {str(t.sha256)[:12]} now, {str(sha256)[:12]} at build): "
                        "train ids would point at other examples; restore the file or rebuild the "
                        "index")
    return t
