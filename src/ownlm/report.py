"""The report card of a run: one HTML page with every stage's metrics, curves and a sample."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ownlm.core.artifacts import read_manifest
from ownlm.core.errors import OwnlmError

# Artifact folders in pipeline order; alignment's sub-steps each have their own manifest.
STAGES = ("data", "clean", "tokenizer", "shards", "pretrain", "instruct", "augment", "sft", "pairs", "reward",
          "cai/sl_data", "cai/sl", "cai/pairs", "align", "quantize")  # fmt: skip


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict | list):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    parts = [f"<h1>ownlm run: {html.escape(run_dir.name)}</h1>"]
    found = False
    for stage in STAGES:
        m = read_manifest(run_dir / stage)
        if m is None:
            continue
        found = True
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in m["metrics"].items()
        )
        parts.append(
            f"<h2>{stage}</h2><p>{m['created_at']} · {m['wall_time_s']:.1f} s · "
            f"git {m.get('git_commit') or '-'}</p><table>{rows}</table>"
        )
        for png in sorted((run_dir / stage).glob("*.png")):
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f'<img alt="{png.name}" src="data:image/png;base64,{data}">')
        sample = run_dir / stage / "sample.txt"
        if sample.is_file():
            parts.append(f"<h3>sample</h3><pre>{html.escape(sample.read_text(encoding='utf-8'))}</pre>")
    if not found:
        raise OwnlmError(f"{run_dir}: no stage artifacts here (is it a run directory?)")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:2px 12px}"
        "tr:nth-child(odd){background:#f4f4f4}pre{white-space:pre-wrap;background:#f8f8f8;padding:1em}"
    )
    out = run_dir / "report.html"
    out.write_text(
        f"<!doctype html><meta charset=utf-8><title>ownlm {html.escape(run_dir.name)}</title>"
        f"<style>{style}</style>{''.join(parts)}",
        encoding="utf-8",
    )
    return out
