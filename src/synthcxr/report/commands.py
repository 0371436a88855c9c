"""`synthcxr report DIR`: one self-contained HTML page for a grid or a single run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    folder: Annotated[Path, typer.Argument(help="A grid output folder, a grid run folder, or a training run directory.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file to write (default: FOLDER/report.html).")] = None,
    max_samples: Annotated[int, typer.Option(help="Rows (prompt x seed) in the side-by-side sample grid.")] = 8,
) -> None:
    """Build the report: configs, loss curves, samples, metrics, memorization pairs, reader study."""
    from synthcxr.logging_utils import console
    from synthcxr.report.build import build_report

    path = build_report(folder, out, max_samples=max_samples)
    typer.echo(str(path))
    console.print(f"open {path} in a browser (self-contained, works offline)", highlight=False)
