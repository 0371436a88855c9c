"""The grid's summary table: one row per run, written as CSV (for analysis) and Markdown (to read).

Columns: run, status, method, optimizer, every evaluation metric with its CI, final validation
loss, training time, training images/s, peak memory, trainable parameters, and the reader-study
results for that run when a study was analysed.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from synthcxr.fileio import atomic_write_text
from synthcxr.report.collect import Metric, ReportData, RunData, _fmt, load_report_data


def _row_metrics(row: dict[str, Any]) -> list[Metric]:
    """Flat rows like {"realism_mean": 3.1, "realism_ci": [2.8, 3.4], "n_images": 10} -> metrics."""
    out = []
    for key, value in row.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or key.startswith("n_") or key.endswith(("_sd", "_std", "_n")):
            continue
        stem = key.removesuffix("_mean").removesuffix("_fraction")
        ci = next((row[c] for c in (f"{key}_ci", f"{stem}_ci") if isinstance(row.get(c), list | tuple)), None)
        low, high = (ci[0], ci[1]) if ci and len(ci) == 2 and None not in ci else (None, None)
        out.append(Metric(f"study.{key.removesuffix('_mean')}", float(value), low, high))
    return out


def study_metrics(study: dict[str, Any] | None, run_name: str) -> list[Metric]:
    """Reader-study numbers for one run (one study group) from the study analysis, if any."""
    if not study:
        return []
    for key in ("groups", "models", "per_model", "by_model"):
        section = study.get(key)
        if isinstance(section, list):
            for row in section:
                if isinstance(row, dict) and (row.get("group") == run_name or row.get("model") == run_name):
                    return _row_metrics(row)
        elif isinstance(section, dict) and isinstance(section.get(run_name), dict):
            return _row_metrics(section[run_name])
    return []


def _train_columns(run: RunData) -> dict[str, Any]:
    val = run.final_val_loss()
    seconds = run.train_seconds()
    ips = run.images_per_second()
    mem = run.peak_memory_mb()
    params = run.trainable_params()
    return {
        "val_loss": val,
        "train_time_s": round(seconds, 1) if seconds is not None else None,
        "images_per_s": round(ips, 3) if ips is not None else None,
        "peak_memory_mb": round(mem, 1) if mem is not None else None,
        "trainable_params": params,
    }


def summary_table(data: ReportData) -> tuple[list[str], list[dict[str, Any]], dict[str, list[str]]]:
    """(columns, rows of plain values, metric columns per kind) for CSV/Markdown/HTML.

    A metric appears as three CSV columns (`fid`, `fid_low`, `fid_high`) and one Markdown column
    (`fid` as "value [low, high]").
    """
    rows: list[dict[str, Any]] = []
    metric_names: list[str] = []
    study_names: list[str] = []
    per_run: list[tuple[RunData, list[Metric], list[Metric]]] = []
    for run in data.runs:
        metrics = run.metric_list()
        study = study_metrics(data.study, run.name)
        for m in metrics:
            if m.name not in metric_names:
                metric_names.append(m.name)
        for m in study:
            if m.name not in study_names:
                study_names.append(m.name)
        per_run.append((run, metrics, study))
    for run, metrics, study in per_run:
        row: dict[str, Any] = {"run": run.name, "status": run.status or ("done" if run.eval else "incomplete"),
                               "family": run.family, "method": run.method, "optimizer": run.optimizer}
        by_name = {m.name: m for m in [*metrics, *study]}
        for name in [*metric_names, *study_names]:
            row[name] = by_name.get(name)
        row.update(_train_columns(run))
        row["error"] = (run.error or "").splitlines()[0] if run.error else ""
        rows.append(row)
    if any(row["family"] for row in rows):  # one table comparing families: runs of a family side by side
        rows.sort(key=lambda row: row["family"] or "")
    columns = ["run", "status", *(["family"] if any(row["family"] for row in rows) else []), "method", "optimizer",
               *metric_names, "val_loss", "train_time_s", "images_per_s",
               "peak_memory_mb", "trainable_params", *study_names, "error"]
    return columns, rows, {"eval": metric_names, "study": study_names}


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    flat_cols: list[str] = []
    for col in columns:
        flat_cols.append(col)
        if any(isinstance(r.get(col), Metric) for r in rows):
            flat_cols += [f"{col}_low", f"{col}_high"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=flat_cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out: dict[str, Any] = {}
        for col in columns:
            value = row.get(col)
            if isinstance(value, Metric):
                out[col], out[f"{col}_low"], out[f"{col}_high"] = value.value, value.low, value.high
            else:
                out[col] = "" if value is None else value
        writer.writerow(out)
    return buf.getvalue()


def cell(value: Any) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, Metric):
        return value.format()
    if isinstance(value, float):
        return _fmt(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(esc(cell(row.get(c))) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path) -> tuple[Path, Path]:
    """Write `summary.csv` and `summary.md` for a grid folder; returns their paths."""
    out_dir = Path(out_dir)
    data = load_report_data(out_dir)
    columns, rows, _ = summary_table(data)
    csv_path = atomic_write_text(out_dir / "summary.csv", to_csv(columns, rows))
    md = f"# {data.title}\n\nMetrics as value [95% CI] where the evaluation gave one.\n\n" + to_markdown(columns, rows)
    md_path = atomic_write_text(out_dir / "summary.md", md)
    return csv_path, md_path
