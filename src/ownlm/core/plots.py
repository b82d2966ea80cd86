"""PNG plots of training curves (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_curve(metrics_path: Path, out_png: Path, title: str = "pretraining") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def bar_panels(
    panels: list[tuple[str, dict[str, float]]], out_png: Path, title: str, ylim: float = 1.0
) -> Path:
    """Side-by-side bar charts, one per (title, {label: value}) panel: win rates, refusal rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (name, values) in zip(axes[0], panels, strict=True):
        bars = ax.bar(list(values), list(values.values()), color="#4C72B0")
        ax.bar_label(bars, fmt="%.2f")
        ax.set_ylim(0, ylim)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
