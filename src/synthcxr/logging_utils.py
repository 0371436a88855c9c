"""Logging and progress bars shared by every stage (library code never prints)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("synthcxr")
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("synthcxr") else f"synthcxr.{name}")


class RateColumn(ProgressColumn):
    """Items per second measured over this run only (resumed items are not counted as fast ones)."""

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("? it/s", style="cyan")
        return Text(f"{speed:.2f} it/s" if speed >= 0.1 else f"{1 / speed:.1f} s/it", style="cyan")


@contextmanager
def progress_bar(total: int, description: str, *, completed: int = 0, fields: str = "") -> Iterator[tuple[Progress, int]]:
    """A rich progress bar: done/total, rate, elapsed and ETA, plus optional extra fields.

    `completed` starts a resumed job's bar where it stopped; rich estimates speed from updates made
    in this process only, so the ETA reflects the remaining work at the current speed.
    `fields` is a format string over task fields, e.g. "loss={task.fields[loss]:.4f}" (pass initial
    values through `progress.update(task, loss=...)`).
    """
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    if fields:
        columns.append(TextColumn(fields))
    with Progress(*columns, console=console, transient=False, speed_estimate_period=120) as progress:
        task = progress.add_task(description, total=total, completed=completed)
        yield progress, task
