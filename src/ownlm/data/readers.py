"""Read user data into corpus records, whatever shape it arrives in.

`read_source` looks at what a path is (a folder of text files, a `.txt`/`.md`/`.jsonl`/`.parquet`
file, or a `datasets` `save_to_disk` folder) and yields records with stable, unique ids, so
re-running the data stage on the same input gives the same corpus. Bad input stops with one
line naming the file (and line, row or field), never a traceback from deep inside a library.
Large inputs are streamed: parquet in row batches, datasets through Arrow memory-mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ownlm.core.errors import OwnlmError
from ownlm.data.records import Record, decode_utf8, iter_jsonl_numbered

TEXT_SUFFIXES = (".txt", ".md")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_BATCH = 1024


def read_source(path: Path, *, domain: str | None = None) -> Iterator[Record]:
    """Yield the records in `path`; `domain` overrides the domain in the records' meta.

    Empty files and empty texts yield nothing: whether an empty corpus is an error is the caller's call.
    """
    path = Path(path)
    if not path.exists():
        raise OwnlmError(f"{path}: no such file or directory")
    if path.is_dir():
        if any((path / m).is_file() for m in _HF_MARKERS):
            yield from _read_hf_dataset(path, domain)
        else:
            yield from _read_folder(path, domain)
    else:
        yield from _read_file(path, path.name, str(path), domain, _UniqueIds())


def _meta(source: str, domain: str | None, given: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"domain": "user", "source": source, "license": "unknown", **(given or {})}
    if domain is not None:
        meta["domain"] = domain
    return meta


class _UniqueIds:
    """Ids must not collide within a source (later stages dedupe and split by id); derived ids
    cannot, so only ids the user gave can trip this."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, given: Any, fallback: str, at: str) -> str:
        rid = fallback if given is None else str(given)
        if rid in self.seen:
            raise OwnlmError(f"{at}: duplicate id {rid!r}")
        self.seen.add(rid)
        return rid


def _read_folder(root: Path, domain: str | None) -> Iterator[Record]:
    # Hidden files and unknown suffixes (a LICENSE, a .DS_Store) are skipped, not errors: folders
    # of real documents hold such things, and the caller reports a corpus that comes out empty.
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    ids = _UniqueIds()
    for p in files:
        try:
            yield from _read_file(p, p.relative_to(root).as_posix(), str(root), domain, ids)
        except FileNotFoundError:
            # Listed, then deleted (a sync or another job): stop with a clear line; the stage writes
            # nothing, so rerunning once the folder is stable loses nothing.
            raise OwnlmError(f"{p}: vanished while its folder was read; rerun when it is stable") from None


def _read_file(path: Path, name: str, source: str, domain: str | None, ids: _UniqueIds) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        text = decode_utf8(path.read_bytes(), str(path)).removeprefix("\ufeff").replace("\r\n", "\n")
        if text.strip():
            yield {"id": ids(None, name, str(path)), "text": text, "meta": _meta(source, domain)}
    elif suffix == ".jsonl":
        for lineno, obj in iter_jsonl_numbered(path):
            if obj["text"].strip():
                rid = ids(obj.get("id"), f"{name}:{lineno}", f"{path}:{lineno}")
                yield {"id": rid, "text": obj["text"], "meta": _meta(source, domain, obj.get("meta"))}
    elif suffix == ".parquet":
        yield from _read_parquet(path, name, source, domain, ids)
    else:
        raise OwnlmError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r} (expected "
            f"{', '.join(FILE_SUFFIXES)}, a folder of them, or a datasets save_to_disk folder)"
        )


def _read_parquet(
    path: Path, name: str, source: str, domain: str | None, ids: _UniqueIds
) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise OwnlmError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    _check_text_column(path, schema.names, schema.field("text").type if "text" in schema.names else None)
    columns = ["text", "id"] if "id" in schema.names else ["text"]
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH, columns=columns):
        data = batch.to_pydict()
        given = data.get("id") or [None] * batch.num_rows
        for i, text in enumerate(data["text"], start=row):
            yield from _row(ids, text, given[i - row], f"{name}:{i}", f"{path}: row {i}", source, domain)
        row += batch.num_rows


def _read_hf_dataset(root: Path, domain: str | None) -> Iterator[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise OwnlmError(f"{root}: not a loadable datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = ["train"] if "train" in loaded else sorted(loaded)
        parts = [(f"{root.name}/{s}", loaded[s]) for s in splits]
    else:
        parts = [(root.name, loaded)]
    ids = _UniqueIds()
    for name, ds in parts:
        feature = ds.features.get("text")
        _check_text_column(root, list(ds.column_names), getattr(feature, "pa_type", feature), split=name)
        columns = ["text", "id"] if "id" in ds.column_names else ["text"]
        row = 0
        for batch in ds.select_columns(columns).iter(batch_size=_BATCH):
            given = batch.get("id") or [None] * len(batch["text"])
            for i, text in enumerate(batch["text"], start=row):
                at = f"{root} ({name}): row {i}"
                yield from _row(ids, text, given[i - row], f"{name}:{i}", at, str(root), domain)
            row += len(batch["text"])


def _check_text_column(path: Path, names: list[str], typ: Any, split: str | None = None) -> None:
    import pyarrow as pa

    where = f"{path} ({split})" if split else str(path)
    if typ is None:
        raise OwnlmError(f"{where}: no 'text' column (columns: {', '.join(names) or 'none'})")
    stringy = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    if not isinstance(typ, pa.DataType) or not any(is_(typ) for is_ in stringy):
        raise OwnlmError(f"{where}: column 'text' must hold strings (it holds {typ})")


def _row(
    ids: _UniqueIds, text: str | None, given: Any, fallback: str, at: str, source: str, domain: str | None
) -> Iterator[Record]:
    if text is None:
        raise OwnlmError(f"{at}: 'text' is null")
    if text.strip():
        yield {"id": ids(given, fallback, at), "text": text, "meta": _meta(source, domain)}
