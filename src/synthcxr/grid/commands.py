"""`synthcxr grid GRID.yaml --out DIR`: run (or resume) every run of an experiment grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def grid(
    grid_file: Annotated[Path, typer.Argument(help="Grid YAML: base config + axes (see configs/study_grid.yaml).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Grid output folder; re-running resumes it.")],
    launcher: Annotated[str, typer.Option(help="local (sequential), accelerate (subprocess per run), slurm (submitit).")] = "local",
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this run (repeatable).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a grid key, e.g. --set set.train.max_steps=50.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the expanded runs and exit.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write OUT/report.html at the end.")] = True,
) -> None:
    """Expand the grid, then train -> generate -> evaluate each run; finished steps are skipped."""
    from synthcxr.grid.expand import load_plan
    from synthcxr.logging_utils import console

    plan = load_plan(grid_file, overrides)
    runs = plan.select(only)
    if dry_run:
        for run in runs:
            what = "baseline (no training)" if run.is_baseline else ", ".join(f"{k}={v}" for k, v in run.axes.items())
            typer.echo(f"{run.name}: {what}")
        return
    from synthcxr.grid.run import run_grid

    result = run_grid(plan, out, launcher=launcher, only=only)
    if report:
        from synthcxr.report.build import build_report

        path = build_report(out)
        console.print(f"report: {path}", highlight=False)
    console.print(result.describe(), highlight=False)
    if result.interrupted:
        raise typer.Exit(130)
    if not result.ok:
        raise typer.Exit(1)
