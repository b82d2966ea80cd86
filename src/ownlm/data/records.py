"""Corpus records and the JSONL files that hold them.

A record is `{"id": str, "text": str, "meta": {"domain", "source", "license", ...}}`; a corpus is
a directory of JSONL files, one record per line. Every stage after `data` reads this one format,
so a bad line is reported here once, with its file and line number, instead of surfacing later
as a confusing tokenizer or training error. Long documents (whole books) are split into records
of a few thousand words, so no single record dominates a shuffle buffer or a dedup pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ownlm.core.errors import OwnlmError

Record = dict[str, Any]
META_FIELDS = ("domain", "source", "license")


def decode_utf8(data: bytes, where: str, offset: int = 0) -> str:
    """Decode UTF-8 or raise an error naming the byte (`offset` is where `data` starts in its file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OwnlmError(f"{where}: not valid UTF-8 at byte {offset + e.start}") from None


def validate_record(obj: Any, where: str, *, complete: bool = False) -> Record:
    """Check a parsed record. `complete` also demands the id and meta fields a corpus file must have
    (user JSONL may leave them out: the readers fill them in)."""
    if not isinstance(obj, dict):
        raise OwnlmError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("text"), str):
        got = "missing" if "text" not in obj else type(obj["text"]).__name__
        raise OwnlmError(f"{where}: field 'text' must be a string ({got})")
    if "id" in obj and not isinstance(obj["id"], str | int):
        raise OwnlmError(f"{where}: field 'id' must be a string")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        raise OwnlmError(f"{where}: field 'meta' must be an object")
    if complete:
        if not isinstance(obj.get("id"), str):
            raise OwnlmError(f"{where}: field 'id' must be a string")
        meta = obj.get("meta") or {}
        for key in META_FIELDS:
            if not isinstance(meta.get(key), str):
                raise OwnlmError(f"{where}: field 'meta.{key}' must be a string")
    return obj


def write_jsonl(path: Path, records: Iterable[Record]) -> tuple[int, int]:
    """Write records one per line (UTF-8, not ASCII-escaped); returns (records, bytes) written."""
    n = size = 0
    with open(path, "wb") as f:
        for rec in records:
            validate_record(rec, f"{path}: record {n}", complete=True)
            line = json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n"
            f.write(line)
            n += 1
            size += len(line)
    return n, size


def iter_jsonl(path: Path, *, complete: bool = False) -> Iterator[Record]:
    """Yield the records of a JSONL file, skipping blank lines."""
    for _, rec in iter_jsonl_numbered(path, complete=complete):
        yield rec


def iter_jsonl_numbered(path: Path, *, complete: bool = False) -> Iterator[tuple[int, Record]]:
    """Yield (line number, record) pairs: ids derived from a position must survive blank lines.

    Lines are split on b"\\n" only: text may hold U+2028 and friends, which `str.splitlines` would
    wrongly treat as line ends.
    """
    path = Path(path)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_utf8(raw, f"{path}:{lineno}", offset)
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise OwnlmError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield lineno, validate_record(obj, f"{path}:{lineno}", complete=complete)


def chunk_paragraphs(text: str, max_words: int) -> list[str]:
    """Split at blank lines into chunks of at most about `max_words` words; a paragraph longer than
    that (a book of Paradise Lost has no blank line) is cut at line ends instead."""
    units: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        if not (para := para.strip("\n")):
            continue
        units += _pack(para.split("\n"), "\n", max_words) if len(para.split()) > max_words else [para]
    return _pack(units, "\n\n", max_words)


def _pack(pieces: list[str], sep: str, max_words: int) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    words = 0
    for piece in pieces:
        n = len(piece.split())
        if cur and words + n > max_words:
            out.append(sep.join(cur))
            cur, words = [], 0
        cur.append(piece)
        words += n
    return [*out, sep.join(cur)] if cur else out


def iter_corpus(corpus_dir: Path) -> Iterator[Record]:
    """Yield every record of a corpus directory, its `*.jsonl` files in sorted order."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise OwnlmError(f"{corpus_dir}: not a corpus directory")
    for path in sorted(corpus_dir.glob("*.jsonl")):
        yield from iter_jsonl(path, complete=True)


class RecordError(OwnlmError):
    """A bad line of a record file; `reason` is the short key skipped lines are counted under."""

    def __init__(self, where: str, reason: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.reason = reason


def iter_validated_jsonl(
    path: Path, validate, error: type[RecordError], *, on_error: str = "raise", counter=None
) -> Iterator[tuple[int, Any]]:
    """(line number, validate(obj, "file:line")) for each non-blank line of a JSONL file.

    Undecodable bytes and bad JSON raise `error` with reasons `bad_utf8` / `bad_json`, as does
    `validate` for its own reasons; with `on_error="skip"` such lines are counted in `counter`.
    """
    path = Path(path)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                try:
                    line = decode_utf8(raw, where, offset)
                except OwnlmError as e:
                    raise error(where, "bad_utf8", str(e).split(": ", 1)[1]) from None
                finally:
                    offset += len(raw)
                line = line.removeprefix("\ufeff") if lineno == 1 else line
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(where, "bad_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
                value = validate(obj, where)
            except RecordError as e:
                if on_error == "raise":
                    raise
                if counter is not None:
                    counter[e.reason] += 1
                continue
            yield lineno, value
