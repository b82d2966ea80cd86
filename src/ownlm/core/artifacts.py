"""Artifact directories: atomic writes, content hashes and `manifest.json`.

A stage writes into a temporary sibling directory and renames it into place only when it has
finished, so a crash never leaves a half artifact where the next stage (or `ownlm run`'s skip
check) would trust it. The manifest records what went in (hashes), what came out, the metrics,
library versions, git commit and wall time.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ownlm.core.errors import OwnlmError

MANIFEST = "manifest.json"


def ownlm_home() -> Path:
    """ownlm's cache outside the repo: $OWNLM_HOME, default ~/.cache/ownlm."""
    return Path(os.environ.get("OWNLM_HOME") or Path.home() / ".cache" / "ownlm").expanduser()


_VERSIONED = ("ownlm", "torch", "transformers", "tokenizers", "accelerate", "datasets", "safetensors")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a file or of a directory's relative paths and contents (manifest.json excluded:
    it holds wall times, which would make identical outputs hash differently)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and q.name != MANIFEST):
        h.update(p.relative_to(path).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        with suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete artifact, or None when there is none (or it is unreadable)."""
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def require_artifact(stage_dir: Path, what: str) -> dict[str, Any]:
    m = read_manifest(stage_dir)
    if m is None:
        raise OwnlmError(
            f"{stage_dir}: no complete {what} artifact here (no {MANIFEST}); run that stage first"
        )
    return m


@dataclass
class StageWriter:
    """Collects what a stage records while it writes into `tmp`."""

    stage: str
    final: Path
    tmp: Path
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def fingerprint(self) -> str:
        return stage_fingerprint(self.config, self.inputs)


def stage_fingerprint(config: dict[str, Any], inputs: dict[str, str]) -> str:
    """What decides whether a stage must run again: its config and its inputs' hashes."""
    return sha256_json({"config": config, "inputs": inputs})


def is_up_to_date(stage_dir: Path, config: dict[str, Any], inputs: dict[str, str]) -> bool:
    m = read_manifest(stage_dir)
    return m is not None and m.get("fingerprint") == stage_fingerprint(config, inputs)


@contextmanager
def stage_dir(
    final: Path, stage: str, config: dict[str, Any], inputs: dict[str, str]
) -> Iterator[StageWriter]:
    """Write a stage's artifact atomically.

    Yields a `StageWriter` whose `tmp` directory the stage fills. On success the manifest is
    written and `tmp` replaces `final` by rename; on any exception `tmp` is removed and `final`
    (if an older complete artifact was there) is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer = StageWriter(stage=stage, final=final, tmp=tmp, config=config, inputs=dict(inputs))
    try:
        yield writer
        manifest = {
            "stage": stage,
            "config": config,
            "inputs": writer.inputs,
            "fingerprint": writer.fingerprint,
            "outputs": sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()),
            "outputs_hash": sha256_tree(tmp),
            "metrics": writer.metrics,
            "versions": library_versions(),
            "git_commit": git_commit(),
            "host": socket.gethostname(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_time_s": round(time.time() - writer.started, 3),
            **writer.extra,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def artifact_hash(stage_dir: Path) -> str:
    """The content hash of a complete artifact (from its manifest, computed once when written)."""
    m = read_manifest(stage_dir)
    if m is not None and "outputs_hash" in m:
        return m["outputs_hash"]
    return sha256_tree(stage_dir)
