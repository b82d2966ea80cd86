"""What the clean stage did, as pictures: documents in/out per step, duplicate-cluster sizes,
perplexity per domain, and the final mixture (PNG files plus one HTML page)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out)
    _plt().close(fig)
    return out


def _steps_png(per_step: dict, out: Path) -> Path:
    plt = _plt()
    names = list(per_step)
    x = np.arange(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    for ax, key, label in ((a1, "docs", "documents"), (a2, "chars", "characters")):
        ax.bar(x - 0.2, [per_step[n][f"{key}_in"] for n in names], 0.4, label="in")
        ax.bar(x + 0.2, [per_step[n][f"{key}_out"] for n in names], 0.4, label="out")
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(f"{label} in / out per step")
        ax.legend()
    return _save(fig, out)


def _clusters_png(work: Path, out: Path) -> Path | None:
    files = [
        f for f in sorted(work.glob("global_*/clusters.json")) if json.loads(f.read_text())["size_histogram"]
    ]
    if not files:
        return None  # no duplicates anywhere: nothing to draw
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for f in files:
        hist = json.loads(f.read_text())["size_histogram"]
        sizes = sorted(int(s) for s in hist)
        ax.plot(sizes, [hist[str(s)] for s in sizes], "o-", label=f.parent.name.split("_", 2)[-1])
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="cluster size (documents)",
        ylabel="clusters",
        title="duplicate clusters",
    )
    ax.legend()
    return _save(fig, out)


def _perplexity_png(work: Path, out: Path) -> Path | None:
    dirs = sorted(work.glob("global_*_perplexity"))
    if not dirs:
        return None
    sig = dirs[-1] / "signatures"
    ppl, dom = [], []
    for f in sorted(sig.glob("*.ppl.npy")):
        ppl.append(np.load(f))
        dom.append(np.load(f.with_name(f.name.replace(".ppl.", ".domain."))))
    if not ppl:
        return None
    ppl, dom = np.concatenate(ppl), np.concatenate(dom)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    bins = np.logspace(np.log10(max(1.0, ppl.min())), np.log10(max(ppl.max(), 2.0)), 50)
    for d in np.unique(dom):
        ax.hist(ppl[dom == d], bins=bins, histtype="step", label=str(d))
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (reference n-gram model)")
    ax.set_ylabel("documents")
    ax.set_title("perplexity per domain")
    ax.legend()
    return _save(fig, out)


def _mixture_png(mixture: dict, out: Path) -> Path:
    plt = _plt()
    doms = list(mixture["domains"])
    x = np.arange(len(doms))
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    ax.bar(x - 0.2, [mixture["domains"][d]["natural_share"] for d in doms], 0.4, label="natural share")
    ax.bar(x + 0.2, [mixture["weights"][d] for d in doms], 0.4, label=f"{mixture['method']} weight")
    ax.set_xticks(x, doms)
    ax.set_title(f"mixture (entropy {mixture['mixture_entropy_bits']:.2f} bits)")
    ax.legend()
    return _save(fig, out)


def write_clean_report(out_dir: Path, work: Path, per_step: dict, mixture: dict) -> Path:
    pngs = [
        _steps_png(per_step, out_dir / "steps.png"),
        _clusters_png(work, out_dir / "clusters.png"),
        _perplexity_png(work, out_dir / "perplexity.png"),
        _mixture_png(mixture, out_dir / "mixture.png"),
    ]
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['docs_in']:,}</td><td>{s['docs_out']:,}</td>"
        f"<td>{html.escape(', '.join(f'{r}: {c:,}' for r, c in sorted(s['dropped'].items())))}</td>"
        f"<td>{html.escape(', '.join(f'{r}: {c:,}' for r, c in sorted(s['counters'].items())))}</td></tr>"
        for n, s in per_step.items()
    )
    imgs = "".join(
        f'<img alt="{p.name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in pngs
        if p is not None
    )
    page = (
        f"<!doctype html><meta charset=utf-8><title>ownlm clean</title><h1>clean</h1>"
        f"<table border=1 cellpadding=4><tr><th>step</th><th>docs in</th><th>docs out</th><th>dropped</th>"
        f"<th>counters</th></tr>{rows}</table>{imgs}"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
