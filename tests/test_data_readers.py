"""Readers and JSONL records: each input shape on a tiny file, and each bad input's one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ownlm.core.errors import OwnlmError
from ownlm.data.readers import read_source
from ownlm.data.records import chunk_paragraphs, iter_corpus, iter_jsonl, validate_record, write_jsonl


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_text_folder_recursive_sorted_and_skips_hidden_and_empty(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bee\r\nline two", encoding="utf-8")
    (root / "sub" / "a.md").write_text("# Title\n\nbody", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    (root / ".git" / "x.txt").write_text("hidden", encoding="utf-8")
    (root / "LICENSE").write_text("not a document", encoding="utf-8")
    recs = list(read_source(root, domain="notes"))
    assert [r["id"] for r in recs] == ["b.txt", "sub/a.md"]
    assert recs[0]["text"] == "bee\nline two"
    assert recs[1]["meta"] == {"domain": "notes", "source": str(root), "license": "unknown"}


def test_single_md_file(tmp_path: Path) -> None:
    p = tmp_path / "readme.md"
    p.write_text("\ufeffhello ✓", encoding="utf-8")
    (rec,) = read_source(p)
    assert rec["id"] == "readme.md" and rec["text"] == "hello ✓" and rec["meta"]["domain"] == "user"


def test_jsonl_ids_meta_and_blank_lines(tmp_path: Path) -> None:
    p = _jsonl(
        tmp_path / "d.jsonl",
        [
            json.dumps({"id": "x1", "text": "first", "meta": {"license": "MIT", "lang": "en"}}),
            "",
            json.dumps({"text": "no id"}),
            json.dumps({"text": ""}),
        ],
    )
    recs = list(read_source(p, domain="web"))
    assert [r["id"] for r in recs] == ["x1", "d.jsonl:3"]
    assert recs[0]["meta"] == {"domain": "web", "source": str(p), "license": "MIT", "lang": "en"}
    assert [r["id"] for r in read_source(p)] == ["x1", "d.jsonl:3"]  # stable across runs


def test_empty_files_yield_nothing(tmp_path: Path) -> None:
    for name in ("e.txt", "e.jsonl"):
        (tmp_path / name).write_bytes(b"")
        assert list(read_source(tmp_path / name)) == []


def test_parquet_in_batches(tmp_path: Path) -> None:
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(2500)], "n": list(range(2500))}), p)
    recs = list(read_source(p))
    assert len(recs) == 2500 and recs[2499] == {
        "id": "t.parquet:2499",
        "text": "row 2499",
        "meta": {"domain": "user", "source": str(p), "license": "unknown"},
    }
    q = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), q)
    assert [r["id"] for r in read_source(q)] == ["a", "b"]


def test_hf_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "ds"))
    recs = list(read_source(tmp_path / "ds", domain="hf"))
    assert [(r["id"], r["text"]) for r in recs] == [("ds:0", "alpha"), ("ds:1", "beta")]
    assert recs[0]["meta"]["domain"] == "hf"

    test = datasets.Dataset.from_dict({"text": ["gamma"]})
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert [r["id"] for r in read_source(tmp_path / "dd")] == ["dd/train:0", "dd/train:1"]
    datasets.DatasetDict({"b": test, "a": ds}).save_to_disk(str(tmp_path / "nt"))
    assert [r["id"] for r in read_source(tmp_path / "nt")] == ["nt/a:0", "nt/a:1", "nt/b:0"]


def test_hf_dataset_without_text_column(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(OwnlmError, match=r"ds.*no 'text' column \(columns: body\)"):
        list(read_source(tmp_path / "ds"))


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("bad.txt", b"ok\xff", r"bad\.txt: not valid UTF-8 at byte 2"),
        ("bad.md", b"\xc3(", r"bad\.md: not valid UTF-8 at byte 0"),
        ("bad.jsonl", b'{"text": "a"}\n[1,2]\n', r"bad\.jsonl:2: expected a JSON object, got list"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', r"bad\.jsonl:2: not valid JSON"),
        ("bad.jsonl", b'{"body": "a"}\n', r"bad\.jsonl:1: field 'text' must be a string \(missing\)"),
        ("bad.jsonl", b'{"text": 3}\n', r"bad\.jsonl:1: field 'text' must be a string \(int\)"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', r"bad\.jsonl:2: not valid UTF-8 at byte 24"),
        ("bad.jsonl", b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', r"bad\.jsonl:2: duplicate id"),
        ("bad.csv", b"text\nhello\n", r"bad\.csv: unsupported file type '\.csv'"),
        ("bad.parquet", b"not parquet", r"bad\.parquet: not a readable parquet file"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(OwnlmError, match=pattern):
        list(read_source(tmp_path / name))


def test_bad_parquet_columns(tmp_path: Path) -> None:
    p = tmp_path / "nt.parquet"
    pq.write_table(pa.table({"body": ["x"]}), p)
    with pytest.raises(OwnlmError, match=r"nt\.parquet: no 'text' column \(columns: body\)"):
        list(read_source(p))
    pq.write_table(pa.table({"text": [1, 2]}), p)
    with pytest.raises(OwnlmError, match=r"nt\.parquet: column 'text' must hold strings \(it holds int64\)"):
        list(read_source(p))
    pq.write_table(pa.table({"text": ["a", None]}), p)
    with pytest.raises(OwnlmError, match=r"nt\.parquet: row 1: 'text' is null"):
        list(read_source(p))


def test_duplicate_ids_across_a_folder(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", [json.dumps({"id": "k", "text": "one"})])
    _jsonl(tmp_path / "b.jsonl", [json.dumps({"text": "two"}), json.dumps({"id": "k", "text": "three"})])
    with pytest.raises(OwnlmError, match=r"b\.jsonl:2: duplicate id 'k'"):
        list(read_source(tmp_path))
    (tmp_path / "b.jsonl").unlink()
    pq.write_table(pa.table({"id": ["x", "x"], "text": ["a", "b"]}), tmp_path / "c.parquet")
    with pytest.raises(OwnlmError, match=r"c\.parquet: row 1: duplicate id 'x'"):
        list(read_source(tmp_path))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(OwnlmError, match=r"nope\.jsonl: no such file or directory"):
        list(read_source(tmp_path / "nope.jsonl"))


def test_write_and_iter_roundtrip_keeps_unicode_line_separators(tmp_path: Path) -> None:
    recs = [
        {"id": "1", "text": "naïve\u2028next", "meta": {"domain": "d", "source": "s", "license": "l"}},
        {"id": "2", "text": "two", "meta": {"domain": "d", "source": "s", "license": "l", "x": 1}},
    ]
    n, size = write_jsonl(tmp_path / "b.jsonl", recs)
    raw = (tmp_path / "b.jsonl").read_bytes()
    assert (n, size) == (2, len(raw)) and "naïve".encode() in raw
    write_jsonl(tmp_path / "a.jsonl", recs[1:])
    assert list(iter_jsonl(tmp_path / "b.jsonl")) == recs
    assert [r["id"] for r in iter_corpus(tmp_path)] == ["2", "1", "2"]


def test_write_rejects_incomplete_records(tmp_path: Path) -> None:
    with pytest.raises(OwnlmError, match=r"meta\.license"):
        write_jsonl(tmp_path / "x.jsonl", [{"id": "1", "text": "t", "meta": {"domain": "d", "source": "s"}}])
    with pytest.raises(OwnlmError, match="field 'id'"):
        validate_record({"text": "t"}, "here", complete=True)
    assert validate_record({"text": "t"}, "here") == {"text": "t"}


def test_chunk_paragraphs() -> None:
    text = "\n\n".join(" ".join(["w"] * 40) for _ in range(10))
    chunks = chunk_paragraphs(text, 100)
    assert [len(c.split()) for c in chunks] == [80, 80, 80, 80, 80] and "\n\n" in chunks[0]
    verse = "\n".join(" ".join(["v"] * 10) for _ in range(25))  # one 250-word paragraph
    assert [len(c.split()) for c in chunk_paragraphs(verse, 100)] == [100, 100, 50]
    assert chunk_paragraphs(" \n\n ", 10) == []
