"""Bad rows in every source format: each one lands in rejects.jsonl with file, line and reason,
and every good row around it is kept. (The split: test_split.py; too many rejects:
test_reject_limits.py.)"""

from __future__ import annotations

import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import validate_config
from pipeline.errors import UserError
from tests.shard_checks import J, make_cfg, make_raw, rejects_of, run_shard, shard_rows

LABELS = ["negative", "positive"]


def input_rows(path: Path) -> int:
    """Rows a source holds, counted independently of the shard stage: non-blank lines (minus a csv
    header), or the parquet row count."""
    if path.suffix == ".parquet":
        return pq.read_metadata(path).num_rows
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    return len(lines) - (1 if path.suffix == ".csv" else 0)


# --- one source file per format, with the outcome every row must have --------------------------
# An entry is (row, outcome): outcome is (text, label) for a kept row, a list of words the reject
# reason must contain, or None for a blank line (neither kept nor rejected).


def write_source(path: Path, entries: list, header: bytes | None = None,
                 schema: pa.Schema | None = None) -> list[tuple[str, int, object]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist([row for row, _ in entries], schema=schema), path)
        first = 1
    else:
        lines = ([header] if header is not None else []) + [row for row, _ in entries]
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        first = 2 if header is not None else 1
    return [(str(path), first + index, outcome) for index, (_, outcome) in enumerate(entries)]


def jsonl_text(folder: Path) -> list:
    return write_source(folder / "text.jsonl", [
        (J({"text": "good one"}), ("good one", None)),
        (b'{"text": "good two"', ["malformed JSON"]),
        (J(["text", "an array"]), ["expected a JSON object, got list"]),
        (J({"body": "no text field"}), ["missing field 'text'"]),
        (J({"text": 42}), ["field 'text' must be a string, got int"]),
        (J({"text": ""}), ["empty text in field 'text'"]),
        (J({"text": "  \t "}), ["empty text in field 'text'"]),
        (b"", None),
        (b'\xff\xfe{"text": "bad bytes"}', ["invalid UTF-8"]),
        (J({"text": "good three", "extra": [1, 2]}), ("good three", None)),
        (J({"text": None}), ["missing field 'text'"]),
        (b"   ", None),
        (J("just a string"), ["expected a JSON object, got str"]),
        (J({"text": ["a", "list"]}), ["field 'text' must be a string, got list"]),
        (J({"text": "caf\u00e9 \u2603 good four"}), ("caf\u00e9 \u2603 good four", None)),
    ])


def jsonl_classification(folder: Path) -> list:
    return write_source(folder / "labelled.jsonl", [
        (J({"text": "good a", "label": "positive"}), ("good a", 1)),
        (J({"text": "good b", "label": 0}), ("good b", 0)),
        (J({"text": "bad name", "label": "neutral"}), ["unknown label 'neutral'", "negative", "positive"]),
        (J({"text": "bad index", "label": 2}), ["unknown label 2"]),
        (J({"text": "negative index", "label": -1}), ["unknown label -1"]),
        (J({"text": "no label"}), ["missing field 'label'"]),
        (J({"text": "null label", "label": None}), ["missing field 'label'"]),
        (J({"text": "good c", "label": "1"}), ("good c", 1)),
        (J({"text": "empty label", "label": ""}), ["missing field 'label'"]),
        (b"", None),
        (J({"text": "bool label", "label": True}), ["unknown label True"]),
        (J({"label": "positive"}), ["missing field 'text'"]),
        (b"{not json", ["malformed JSON"]),
        (b"\xc3\x28 broken", ["invalid UTF-8"]),
        (J({"text": "good d", "label": "negative"}), ("good d", 0)),
    ])


def csv_classification(folder: Path) -> list:
    return write_source(folder / "labelled.csv", [
        (b"good a,positive", ("good a", 1)),
        (b'"good, quoted",0', ("good, quoted", 0)),
        (b"bad name,neutral", ["unknown label 'neutral'"]),
        (b"bad index,7", ["unknown label '7'"]),
        (b"missing label,", ["missing field 'label'"]),
        (b",positive", ["empty text in field 'text'"]),
        (b'"   ",1', ["empty text in field 'text'"]),
        (b"bad \xff\xfe bytes,1", ["invalid UTF-8"]),
        (b"too,many,fields", ["more fields than the header"]),
        (b"only text no comma", ["missing field 'label'"]),
        (b"", None),
        (b"good c,1", ("good c", 1)),
    ], header=b"text,label")


def csv_text(folder: Path) -> list:
    return write_source(folder / "text.csv", [
        (b"1,good one", ("good one", None)),
        (b"2,", ["empty text in field 'text'"]),
        (b"3", ["missing field 'text'"]),
        (b"4,\"good, two\"", ("good, two", None)),
        (b"5,bad \xe9 latin-1", ["invalid UTF-8"]),
        (b"6,good three\r", ("good three", None)),
    ], header=b"id,text")


def txt_text(folder: Path) -> list:
    return write_source(folder / "lines.txt", [
        (b"good line one", ("good line one", None)),
        (b"", None),
        (b"  \t ", None),
        (b"bad \xff\xfe bytes", ["invalid UTF-8"]),
        (b"good line two\r", ("good line two", None)),  # CRLF line ending is stripped
        (b"\xe2\x82", ["invalid UTF-8"]),  # truncated multi-byte sequence
        (b'{"text": "not json here"}', ('{"text": "not json here"}', None)),
    ])


def parquet_text(folder: Path) -> list:
    return [
        *write_source(folder / "a.parquet", [
            ({"text": "good one", "other": 1}, ("good one", None)),
            ({"text": None, "other": 2}, ["missing field 'text'"]),
            ({"text": "", "other": 3}, ["empty text in field 'text'"]),
            ({"text": " \n ", "other": 4}, ["empty text in field 'text'"]),
            ({"text": "good two", "other": 5}, ("good two", None)),
        ], schema=pa.schema([("text", pa.string()), ("other", pa.int64())])),
        *write_source(folder / "b-number.parquet", [
            ({"text": 7}, ["field 'text' must be a string, got int"]),
            ({"text": 8}, ["field 'text' must be a string, got int"]),
        ], schema=pa.schema([("text", pa.int64())])),
        *write_source(folder / "c-bytes.parquet", [
            ({"text": b"\xff\xfe raw"}, ["field 'text' must be a string, got bytes"]),
        ], schema=pa.schema([("text", pa.binary())])),
        *write_source(folder / "d-no-text.parquet", [
            ({"body": "x"}, ["missing field 'text'"]),
        ], schema=pa.schema([("body", pa.string())])),
        *write_source(folder / "e.parquet", [
            ({"text": "good three"}, ("good three", None)),
        ], schema=pa.schema([("text", pa.string())])),
    ]


def parquet_classification(folder: Path) -> list:
    return [
        *write_source(folder / "names.parquet", [
            ({"text": "good a", "label": "positive"}, ("good a", 1)),
            ({"text": "bad name", "label": "neutral"}, ["unknown label 'neutral'"]),
            ({"text": "bad index", "label": "5"}, ["unknown label '5'"]),
            ({"text": "good b", "label": "0"}, ("good b", 0)),
            ({"text": "no label", "label": None}, ["missing field 'label'"]),
            ({"text": "empty label", "label": ""}, ["missing field 'label'"]),
            ({"text": None, "label": "positive"}, ["missing field 'text'"]),
        ], schema=pa.schema([("text", pa.string()), ("label", pa.string())])),
        *write_source(folder / "indices.parquet", [
            ({"text": "good c", "label": 1}, ("good c", 1)),
            ({"text": "bad index", "label": 2}, ["unknown label 2"]),
            ({"text": "negative", "label": -1}, ["unknown label -1"]),
            ({"text": "null label", "label": None}, ["missing field 'label'"]),
            ({"text": "good d", "label": 0}, ("good d", 0)),
        ], schema=pa.schema([("text", pa.string()), ("label", pa.int64())])),
    ]


CASES = {
    "jsonl-text": (jsonl_text, False),
    "jsonl-classification": (jsonl_classification, True),
    "csv-text": (csv_text, False),
    "csv-classification": (csv_classification, True),
    "txt-text": (txt_text, False),
    "parquet-text": (parquet_text, False),
    "parquet-classification": (parquet_classification, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_rows_are_rejected_with_file_line_and_reason(tmp_path, model_dir, case):
    build, classify = CASES[case]
    expected = build(tmp_path / "src")
    sources = list(dict.fromkeys(Path(f) for f, _, _ in expected))
    cfg = make_cfg(tmp_path, model_dir, sources, classify, max_reject_fraction=1.0)
    manifest = run_shard(cfg)

    want_rejects = [(f, line, outcome) for f, line, outcome in expected if isinstance(outcome, list)]
    want_kept = sorted((f, line, *outcome) for f, line, outcome in expected if isinstance(outcome, tuple))
    assert want_rejects and want_kept

    rejects = rejects_of(cfg)
    assert [(r["file"], r["line"]) for r in rejects] == [(f, line) for f, line, _ in want_rejects]
    for record, (_, _, words) in zip(rejects, want_rejects):
        for word in words:
            assert word in record["reason"], (record, word)

    rows = shard_rows(cfg)
    kept = sorted((r["source"], r["line"], r["text"], r.get("label"))
                  for split in rows.values() for r in split)
    assert kept == want_kept

    # nothing silently dropped: every non-blank input row is either kept or rejected
    assert len(kept) + len(rejects) == sum(input_rows(p) for p in sources)
    assert manifest["rejected"] == len(rejects)
    assert [{k: s[k] for k in ("path", "rows", "rejected")} for s in manifest["sources"]] == [
        {"path": str(p), "rows": sum(1 for k in want_kept if k[0] == str(p)),
         "rejected": sum(1 for r in want_rejects if r[0] == str(p))} for p in sources]
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["eval"]["rows"] == len(kept)
    assert manifest["rejects_file"] == "data/rejects.jsonl"


def test_reject_record_keeps_the_raw_line(tmp_path, model_dir):
    source = write_source(tmp_path / "d.jsonl", [(J({"text": "fine"}), None), (b'{"text": oops}', None)])
    cfg = make_cfg(tmp_path, model_dir, [Path(source[0][0])], max_reject_fraction=1.0)
    run_shard(cfg)
    assert rejects_of(cfg) == [{"file": source[0][0], "line": 2,
                                "reason": "malformed JSON: Expecting value at column 10",
                                "row": '{"text": oops}'}]


def test_label_as_name_and_as_index_map_to_the_same_integer(tmp_path, model_dir):
    jsonl = write_source(tmp_path / "l.jsonl", [
        (J({"text": "by name pos", "label": "positive"}), None),
        (J({"text": "by index pos", "label": 1}), None),
        (J({"text": "by digit string pos", "label": "1"}), None),
        (J({"text": "by name neg", "label": "negative"}), None),
        (J({"text": "by index neg", "label": 0}), None),
        (J({"text": "twin", "label": "positive"}), None),
        (J({"text": "twin", "label": 1}), None),
    ])
    csv = write_source(tmp_path / "l.csv", [(b"csv name pos,positive", None), (b"csv index pos,1", None),
                                            (b"csv index neg,0", None)], header=b"text,label")
    cfg = make_cfg(tmp_path, model_dir, [Path(jsonl[0][0]), Path(csv[0][0])], classify=True)
    run_shard(cfg)
    assert rejects_of(cfg) == []
    rows = shard_rows(cfg)
    labels = {(r["text"], r["line"]): r["label"] for split in rows.values() for r in split}
    assert labels == {("by name pos", 1): 1, ("by index pos", 2): 1, ("by digit string pos", 3): 1,
                      ("by name neg", 4): 0, ("by index neg", 5): 0, ("twin", 6): 1, ("twin", 7): 1,
                      ("csv name pos", 2): 1, ("csv index pos", 3): 1, ("csv index neg", 4): 0}
    # the split hash sees the normalised row, so both spellings of the twin land together
    where = {(r["text"], r["line"]): (split, r["shard"]) for split, rs in rows.items() for r in rs}
    assert where[("twin", 6)] == where[("twin", 7)]


def test_labels_by_index_only_with_num_labels(tmp_path, model_dir):
    source = write_source(tmp_path / "n.jsonl", [
        (J({"text": "a", "label": 0}), None), (J({"text": "b", "label": 2}), None),
        (J({"text": "c", "label": 3}), None), (J({"text": "d", "label": "positive"}), None)])
    raw = make_raw(tmp_path, model_dir, [Path(source[0][0])], classify=True, max_reject_fraction=1.0)
    raw["data"]["labels"] = None
    raw["model"]["num_labels"] = 3
    cfg = validate_config(raw)
    run_shard(cfg)
    assert [(r["line"], r["reason"]) for r in rejects_of(cfg)] == [
        (3, "unknown label 3 (expected one of 0..2)"), (4, "unknown label 'positive' (expected one of 0..2)")]
    assert sorted(r["label"] for rs in shard_rows(cfg).values() for r in rs) == [0, 2]


# --- inputs that once crashed the stage or lost rows -----------------------------------------------


@pytest.mark.parametrize("label", ["--1", "\u00b2"], ids=["double-minus", "superscript-two"])
def test_odd_label_strings_are_rejected_not_crashing(tmp_path, model_dir, label):
    source = write_source(tmp_path / "l.jsonl", [(J({"text": "good", "label": 1}), None),
                                                 (J({"text": "odd", "label": label}), None)])
    cfg = make_cfg(tmp_path, model_dir, [Path(source[0][0])], classify=True, max_reject_fraction=1.0)
    run_shard(cfg)
    assert [(r["line"], r["reason"].startswith("unknown label")) for r in rejects_of(cfg)] == [(2, True)]


def test_lone_surrogate_in_jsonl_is_rejected(tmp_path, model_dir):
    source = tmp_path / "s.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "broken \\ud83d emoji"}\n{"text": "also fine"}\n')
    cfg = make_cfg(tmp_path, model_dir, [source], max_reject_fraction=1.0)
    run_shard(cfg)
    assert [r["line"] for r in rejects_of(cfg)] == [2]
    assert sorted(r["text"] for rs in shard_rows(cfg).values() for r in rs) == ["also fine", "fine"]


def _unchecked_string_array(values: list[bytes]) -> pa.Array:
    """A parquet string column holding bytes that are not UTF-8 (as some writers produce)."""
    offsets = [0]
    for value in values:
        offsets.append(offsets[-1] + len(value))
    return pa.Array.from_buffers(pa.string(), len(values), [
        None, pa.py_buffer(struct.pack(f"<{len(offsets)}i", *offsets)), pa.py_buffer(b"".join(values))])


def test_invalid_utf8_in_parquet_string_column(tmp_path, model_dir):
    source = tmp_path / "bad-utf8.parquet"
    pq.write_table(pa.table({"text": _unchecked_string_array([b"good one", b"bad \xff\xfe", b"good two"])}),
                   source)
    cfg = make_cfg(tmp_path, model_dir, [source], max_reject_fraction=1.0)
    try:
        run_shard(cfg)
    except UserError as err:  # a clear one-line error naming the file is acceptable too
        assert str(source) in str(err)
        return
    assert [(r["line"], "UTF-8" in r["reason"]) for r in rejects_of(cfg)] == [(2, True)]
    assert sorted(r["text"] for rs in shard_rows(cfg).values() for r in rs) == ["good one", "good two"]


def test_csv_with_utf8_bom_is_read(tmp_path, model_dir):
    source = tmp_path / "excel.csv"
    source.write_bytes(b"\xef\xbb\xbftext,label\ngood a,positive\ngood b,negative\n")
    cfg = make_cfg(tmp_path, model_dir, [source], classify=True)
    run_shard(cfg)
    assert rejects_of(cfg) == []
    assert sorted((r["text"], r["label"]) for rs in shard_rows(cfg).values() for r in rs) == [
        ("good a", 1), ("good b", 0)]


# --- hostile rows: each is rejected, the rows around it kept ----------------------------------------


def hostile_jsonl(folder: Path) -> list:
    return write_source(folder / "hostile.jsonl", [
        (J({"text": "good one"}), ("good one", None)),
        (b'{"text": "big", "n": ' + b"9" * 5000 + b"}", ["a number with too many digits"]),
        (b'{"text": "deep", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["nested too deeply"]),
        (b'{"text": "' + b"[" * 100_000 + b'"}', ("[" * 100_000, None)),  # brackets in a string are text
        (J({"text": "good two"}), ("good two", None)),
    ])


def hostile_csv(folder: Path) -> list:
    return write_source(folder / "hostile.csv", [
        (b"good one", ("good one", None)),
        (b'"' + b"x" * 200_000 + b'"', ["unreadable CSV row", "field larger than field limit"]),
        (b"good two", ("good two", None)),
    ], header=b"text")


@pytest.mark.parametrize("build", [hostile_jsonl, hostile_csv], ids=["jsonl", "csv"])
def test_hostile_rows_are_rejected_and_the_others_kept(tmp_path, model_dir, build):
    expected = build(tmp_path / "src")
    cfg = make_cfg(tmp_path, model_dir, [Path(expected[0][0])], max_reject_fraction=1.0)
    run_shard(cfg)
    rejects = rejects_of(cfg)
    want = [(line, words) for _, line, words in expected if isinstance(words, list)]
    assert [r["line"] for r in rejects] == [line for line, _ in want]
    for record, (_, words) in zip(rejects, want):
        assert all(word in record["reason"] for word in words), record
    kept = sorted(r["text"] for rows in shard_rows(cfg).values() for r in rows)
    assert kept == sorted(outcome[0] for _, _, outcome in expected if isinstance(outcome, tuple))


@pytest.mark.parametrize("content", [b"", b"PAR1 not really parquet"], ids=["empty", "garbage"])
def test_broken_container_file_is_one_line_naming_the_file(tmp_path, model_dir, content):
    good = write_source(tmp_path / "good.jsonl", [(J({"text": "fine"}), None)])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(content)
    cfg = make_cfg(tmp_path, model_dir, [Path(good[0][0]), broken], max_reject_fraction=1.0)
    with pytest.raises(UserError) as info:
        run_shard(cfg)  # the stage alone: the file broke after validate read its footer
    assert str(info.value).startswith(f"data.train: {broken}: cannot read: ")
    assert "\n" not in str(info.value)
