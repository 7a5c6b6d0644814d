"""The column-wise text path (plain text, loss on all tokens, truncation) writes exactly the rows the
general per-example path writes."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from pipeline.config import DataConfig
from pipeline.encoding import Encoder, id_lists
from pipeline.tokenizer import load_tokenizer
from tests import fixtures


class PerExample(Encoder):
    column_wise = False


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_bert"])
def test_column_wise_text_equals_the_per_example_path(model, request):
    tokenizer = load_tokenizer(request.getfixturevalue(model))
    data = DataConfig(train=["x"], format="text", max_seq_len=12)
    texts = fixtures.sentences(40, seed=7) + ["a", "b c", " ".join(fixtures.sentences(6, seed=8))]
    rows = {"text": texts, "source": ["s"] * len(texts), "line": list(range(len(texts)))}
    fast, slow = Encoder(tokenizer, data), PerExample(tokenizer, data)
    assert fast.column_wise and not slow.column_wise and fast.rust is not None
    # The Rust backend called directly gives what the tokenizer's own __call__ gives.
    assert fast._encode(texts, True) == tokenizer(texts)["input_ids"]
    tokenizer(texts[:3], truncation=True, max_length=4)  # leaves truncation set on the backend
    assert fast._encode(texts, False) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    got, want = fast(rows), slow(rows)
    assert (got.truncated == want.truncated > 0 and got.rejects == want.rejects
            and got.dropped == want.dropped == 0)
    schema = fast.schema
    assert pa.RecordBatch.from_pydict(got.columns, schema=schema).equals(
        pa.RecordBatch.from_pydict(want.columns, schema=schema))


@pytest.mark.parametrize("eos", [None, 0, 3])
def test_id_lists_equal_appending_eos_list_by_list(eos):
    """Empty lists, lists already ending in EOS and empty batches included."""
    rng = random.Random(eos)
    for _ in range(200):
        lists = [[rng.randint(0, 4) for _ in range(rng.choice([0, 0, 1, 2, 5]))]
                 for _ in range(rng.randint(0, 6))]
        want = lists if eos is None else [s + [eos] if not s or s[-1] != eos else s for s in lists]
        assert id_lists(lists, eos).equals(pa.array(want, pa.list_(pa.int32()))), (lists, eos)
