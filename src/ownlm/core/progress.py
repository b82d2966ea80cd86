"""Progress bars (rich) with ETA, the console every stage prints to, and the training-metrics logger."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)


def quiet() -> bool:
    """No live bars in CI logs or under pytest; plain lines still print."""
    return bool(os.environ.get("OWNLM_QUIET")) or not sys.stderr.isatty()


def bar(description: str, total: float | None, *fields: str, disable: bool = False) -> Progress:
    """A progress bar with elapsed time, ETA and extra live `fields` (e.g. "loss", "tok/s")."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{f} {{task.fields[{f}]}}") for f in fields),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    progress = Progress(*columns, console=console, disable=disable or quiet(), transient=False)
    progress.add_task(description, total=total, **{f: "-" for f in fields})
    return progress


def metrics_callback(metrics_path: Path, name: str, keys: Sequence[str], shown: str = "loss"):
    """Our progress bar and metrics.jsonl rows from a Trainer's logs: `keys` (and their `eval_`
    forms, written as `val_...`) plus the learning rate."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.progress = bar(name, state.max_steps, shown)
            self.progress.start()

        def on_step_end(self, args, state, control, **kw):
            self.progress.update(self.progress.task_ids[0], completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            logs, row = logs or {}, {"step": state.global_step}
            for k in keys:
                if k in logs:
                    row[k] = float(logs[k])
                if f"eval_{k}" in logs:
                    row[f"val_{k}"] = float(logs[f"eval_{k}"])
            if "learning_rate" in logs:
                row["lr"] = float(logs["learning_rate"])
            if shown in row:
                self.progress.update(self.progress.task_ids[0], **{shown: f"{row[shown]:.3f}"})
            if len(row) > 1:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

        def on_train_end(self, args, state, control, **kw):
            self.progress.stop()

    return _Callback()
