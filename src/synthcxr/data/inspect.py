"""`data inspect`: what is in a data set (counts by sex, age band, finding, label, source) and every
problem in it, found in one pass so a user can fix them all before training."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthcxr.data.checks import check_scan
from synthcxr.data.readers import scan_paths
from synthcxr.data.records import XrayRecord
from synthcxr.errors import Problem

AGE_BANDS = ((0, 18, "0-17"), (18, 30, "18-29"), (30, 40, "30-39"), (40, 50, "40-49"), (50, 60, "50-59"),
             (60, 70, "60-69"), (70, 200, "70+"))
MAX_FINDINGS = 15


def age_band(age: float | None) -> str:
    if age is None:
        return "unknown"
    for lo, hi, name in AGE_BANDS:
        if lo <= age < hi:
            return name
    return "unknown"


@dataclass
class InspectReport:
    """Counts over the clean images and every problem found."""

    paths: list[Path]
    records: list[XrayRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        band_order = [b[2] for b in AGE_BANDS] + ["unknown"]
        bands = Counter(age_band(r.age) for r in self.records)
        findings = Counter(r.finding or "unknown" for r in self.records)
        top = dict(findings.most_common(MAX_FINDINGS))
        rest = sum(findings.values()) - sum(top.values())
        if rest:
            top[f"other ({len(findings) - len(top)} kinds)"] = rest
        return {
            "source": dict(sorted(Counter(r.source for r in self.records).items())),
            "label": dict(sorted(Counter(r.label or "unknown" for r in self.records).items())),
            "sex": dict(sorted(Counter(r.sex or "unknown" for r in self.records).items())),
            "age band": {b: bands[b] for b in band_order if bands[b]},
            "finding": top,
        }

    def to_dict(self) -> dict[str, Any]:
        ages = [r.age for r in self.records if r.age is not None]
        return {
            "paths": [str(p) for p in self.paths],
            "images": len(self.records),
            "patients": len({(r.source, r.patient_id) for r in self.records}),
            "age": {"min": min(ages), "max": max(ages), "mean": round(sum(ages) / len(ages), 2)} if ages else None,
            "counts": self.counts(),
            "problems": [{"file": str(p.file), "problem": p.message, "fix": p.fix} for p in self.problems],
        }


def inspect_data(paths: list[Path], format: str = "auto", manifest: Path | None = None,
                 frontal_only: bool = True) -> InspectReport:
    """Read and fully decode every image of `paths`; nothing is skipped silently (big CSVs and image
    sets show progress bars: reading the table, then checking the images)."""
    scan = scan_paths(paths, format, manifest, resolution=None, keep_pixels=False, frontal_only=frontal_only)
    records, problems = check_scan(scan, full=True)
    return InspectReport(paths=list(paths), records=records, problems=problems)


def render_report(report: InspectReport, console) -> None:  # noqa: ANN001 - rich Console
    """Tables for the terminal: summary, one table per count, then the problems with their fixes."""
    from rich.table import Table

    data = report.to_dict()
    age = data["age"]
    age_text = f", age {age['min']:g}-{age['max']:g} (mean {age['mean']:g})" if age else ""
    console.print(f"[bold]{data['images']}[/bold] image(s), {data['patients']} patient(s) in "
                  f"{', '.join(data['paths'])}{age_text}", highlight=False, soft_wrap=True)
    for name, counts in data["counts"].items():
        if not counts:
            continue
        table = Table(title=f"by {name}", title_justify="left", show_edge=False)
        table.add_column(name)
        table.add_column("images", justify="right")
        table.add_column("%", justify="right")
        total = sum(counts.values()) or 1
        for key, n in counts.items():
            table.add_row(key, str(n), f"{100 * n / total:.0f}")
        console.print(table)
    if not report.problems:
        console.print("[green]no problems found[/green]")
        return
    table = Table(title=f"{len(report.problems)} problem(s)", title_justify="left", title_style="bold red",
                  show_lines=True)
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    table.add_column("fix", overflow="fold")
    for p in report.problems:
        table.add_row(str(p.file), p.message, p.fix)
    console.print(table)
