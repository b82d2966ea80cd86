"""Progress bars (rich) with ETA, and the console every stage prints to."""

from __future__ import annotations

import os
import sys

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
