"""--data through `datasets` (grass_index/tasks/hf_lm.py ArrowTokens): the corpus streamed into
memory-mapped Arrow and tokenized in batches gives the same examples as the in-memory list,
sees an edited file, and reports a bad line as the same one error line."""
import json

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from grass_index.indexdir.fingerprints import data_hash  # noqa: E402
from grass_index.tasks.hf_lm import (ArrowTokens, ByteTokenizer, TokenizedTexts,  # noqa: E402
                                     read_texts)
from grass_index.task import TaskError  # noqa: E402

LINES = ["  the quick fox ", "", "ab", "jumps over\u2028the dog", "café au lait", "x" * 50]


def _same(a, b):
    assert len(a) == len(b) and all(torch.equal(a[i], b[i]) for i in range(len(a)))


def test_arrow_items_equal_the_list_items(tmp_path):
    tok = ByteTokenizer()
    txt = tmp_path / "c.txt"
    txt.write_text("\r\n".join(LINES) + "\n", encoding="utf-8", newline="")
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in LINES))
    d = tmp_path / "ds"
    datasets.Dataset.from_generator(lambda: ({"body": t} for t in LINES),
                                    cache_dir=str(tmp_path / "cache"),
                                    fingerprint="test").save_to_disk(str(d))
    for path, field in ((txt, None), (jl, "body"), (d, "body")):
        want = TokenizedTexts(read_texts(path, field), tok, 8)
        got = ArrowTokens(path, field, tok, 8)
        _same(got, want)
        assert data_hash(got) == data_hash(want)
    assert len(got) == 5  # (the save_to_disk column) the empty value dropped
    txt.write_text("another line entirely\n")  # the same path, edited: read again
    _same(ArrowTokens(txt, None, tok, 8), TokenizedTexts(read_texts(txt), tok, 8))


def test_bad_lines_are_the_same_one_line(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(TaskError) as e:
        ArrowTokens(bad, None, ByteTokenizer(), 8)
    assert "line 2 has no field 'text'" in str(e.value)
    short = tmp_path / "s.txt"
    short.write_text("fine line\nz\n")
    with pytest.raises(TaskError, match="example 2 .* fewer than 2 tokens"):
        ArrowTokens(short, None, ByteTokenizer(), 8)
