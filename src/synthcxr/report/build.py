"""Build one self-contained HTML report for a grid (or a single run).

Everything is inside the file: CSS inline, plots and image thumbnails as PNG data URIs, no script
or font from the network, so the report can be mailed, archived or opened on an air-gapped
workstation. Each section is built from whatever data exists; a missing piece shows as
"not evaluated" / "no data" rather than stopping the report.
"""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from synthcxr.fileio import atomic_write_text
from synthcxr.grid.summary import cell, study_metrics, summary_table
from synthcxr.logging_utils import get_logger
from synthcxr.report import plots
from synthcxr.report.collect import Metric, ReportData, RunData, fidelity_tables, load_report_data

log = get_logger(__name__)

LOWER_IS_BETTER = ("fid", "kid", "cmmd", "loss", "ms_ssim", "msssim", "memoriz", "copy", "flagged", "similarity", "nn_")
HIGHER_IS_BETTER = ("precision", "recall", "density", "coverage", "auc", "accuracy", "realism", "judged_real",
                    "fraction_real", "agreement")


WAY_TEXT = {"low": "lower is better", "high": "higher is better", "real": "closest to the real images is best"}


def direction(name: str) -> str | None:
    """"low"/"high" when a metric's name says which way is better, "real" when closeness to the
    real set's value is (diversity), else None (not ranked)."""
    lname = name.lower()
    if "real" in lname.split(".")[-1] and "ms_ssim" in lname:
        return None  # diversity of the real set is the reference value, not a score
    if "ms_ssim" in lname and "synthetic" in lname.split(".")[-1]:
        return "real"  # lowest would favour noise (demo: 0.158 synthetic vs 0.894 real)
    if any(t in lname for t in HIGHER_IS_BETTER):
        return "high"
    if any(t in lname for t in LOWER_IS_BETTER):
        return "low"
    return None


@dataclass
class SampleRow:
    prompt: str
    seed: Any
    cells: list[str | None]
    real: str | None


def _value(cell_value: Any) -> float | None:
    if isinstance(cell_value, Metric):
        return cell_value.value
    return cell_value if isinstance(cell_value, int | float) and not isinstance(cell_value, bool) else None


def _best(rows: list[dict[str, Any]], column: str) -> str | None:
    way = direction(column)
    scored = [(r["run"], _value(r.get(column))) for r in rows if _value(r.get(column)) is not None]
    if way == "real":  # distance to the run's own real-set value, smallest best
        reference = column.replace("synthetic", "real")
        scored = [(r["run"], abs(_value(r[column]) - _value(r.get(reference)))) for r in rows
                  if _value(r.get(column)) is not None and _value(r.get(reference)) is not None]
        way = "low"
    if not way or len(scored) < 2 or len({v for _, v in scored}) == 1:
        return None  # nothing to rank, or every run ties
    return (min if way == "low" else max)(scored, key=lambda x: x[1])[0]


def _ci_overlap(rows: list[dict[str, Any]], column: str, best_run: str) -> bool:
    """True when the best run's CI overlaps another run's: the ranking is not clear-cut."""
    metrics = {r["run"]: r[column] for r in rows if isinstance(r.get(column), Metric)}
    best = metrics.get(best_run)
    if best is None or best.low is None or best.high is None:
        return False
    return any(m.low is not None and m.high is not None and m.low <= best.high and best.low <= m.high
               for name, m in metrics.items() if name != best_run)


def _sample_rows(data: ReportData, max_rows: int, thumb: int) -> tuple[list[SampleRow], bool]:
    """Rows keyed by (prompt, seed), one column per run, so each row compares like with like."""
    keys: list[tuple[str, Any]] = []
    by_run: list[dict[tuple[str, Any], Path]] = []
    for run in data.runs:
        table: dict[tuple[str, Any], Path] = {}
        for row in run.manifest:
            if "file" not in row or run.images_dir is None:
                continue
            key = (str(row.get("prompt", "")), row.get("seed"))
            table.setdefault(key, run.images_dir / row["file"])
            if key not in keys:
                keys.append(key)
        by_run.append(table)
    shared = [k for k in keys if sum(k in t for t in by_run) > 1]
    chosen = (shared or keys)[:max_rows]
    rows = []
    for i, key in enumerate(chosen):
        cells = [plots.image_uri(t[key], thumb) if key in t else None for t in by_run]
        real = plots.image_uri(data.real_images[i], thumb) if i < len(data.real_images) else None
        rows.append(SampleRow(prompt=key[0], seed=key[1], cells=cells, real=real))
    return rows, bool(shared)


def _config_table(data: ReportData) -> tuple[list[str], list[dict[str, Any]]]:
    keys: list[str] = []
    for run in data.runs:
        for key in [*run.axes, *run.overrides]:
            if key not in keys and not any(key == f"{a}" for a in keys):
                keys.append(key)
    # an axis and the config key it sets say the same thing: show the short name only
    from synthcxr.grid.expand import AXIS_ALIASES

    keys = [k for k in keys if not (k in AXIS_ALIASES.values() and any(AXIS_ALIASES.get(a) == k for a in keys))]
    families = [k for k in ("family", "model_params", "resolution")
                if any(r.train_summary.get(k) is not None for r in data.runs) and k not in keys]
    keys = families + keys  # model family, its size and the training resolution first
    rows = []
    for run in data.runs:
        values = {**run.overrides, **run.axes}
        shown = []
        for k in keys:
            if run.baseline:
                shown.append("baseline" if k in AXIS_ALIASES else "–")
            elif k in families:
                shown.append(run.family if k == "family" else run.train_summary.get(k))
            elif k in values:
                shown.append(values[k])
            else:  # not changed by the grid: the value the run actually used
                shown.append(_lookup(run.config, AXIS_ALIASES.get(k, k)))
        rows.append({
            "run": run.name,
            "status": run.status or "–",
            "values": shown,
            "config_yaml": yaml.safe_dump(run.config, sort_keys=False) if run.config else None,
        })
    return keys, rows


def _lookup(config: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "–"
        node = node[part]
    return node


def _memorization(data: ReportData, thumb: int) -> list[dict[str, Any]]:
    out = []
    for run in data.runs:
        if run.eval is None:
            out.append({"run": run.name, "state": "not evaluated", "pairs": []})
            continue
        pairs = []
        for pair in run.memorization_pairs():
            pairs.append({
                "score": cell(pair["score"]) if pair["score"] is not None else "–",
                "kind": pair["kind"],
                "cosine": cell(pair["cosine"]) if pair.get("cosine") is not None else None,
                "flagged": pair.get("flagged", False),
                "alignment": _alignment_text(pair.get("alignment")),
                "side": plots.image_uri(pair["side_by_side"], thumb * 2) if pair["side_by_side"] and pair["side_by_side"].exists() else None,
                "synthetic": plots.image_uri(pair["synthetic"], thumb) if pair["synthetic"] and pair["synthetic"].exists() else None,
                "train": plots.image_uri(pair["train"], thumb) if pair["train"] and pair["train"].exists() else None,
            })
        mem = run.eval.get("memorization") if isinstance(run.eval.get("memorization"), dict) else None
        summary = [m for m in run.metric_list() if m.name.startswith("memorization")]
        out.append({"run": run.name, "state": "ok" if (pairs or summary) else ("no memorization check" if mem is None else "no pairs"),
                    "pairs": pairs, "summary": [(m.name.removeprefix("memorization."), m.format()) for m in summary],
                    "not_flagged": (mem or {}).get("not_flagged_means")})
    return out


def _alignment_text(alignment: dict[str, Any] | None) -> str | None:
    """How the synthetic image was aligned to its training match, e.g. 'mirrored, rotated 2.5°, shifted (3, -2) px'."""
    if not alignment:
        return None
    parts = ["mirrored"] if alignment.get("mirror") else []
    if alignment.get("rotation_deg"):
        parts.append(f"rotated {alignment['rotation_deg']:g}°")
    if alignment.get("scale") not in (None, 1, 1.0):
        parts.append(f"zoomed ×{alignment['scale']:.2f}")
    if any(alignment.get("shift_px") or []):
        parts.append(f"shifted ({', '.join(str(v) for v in alignment['shift_px'])}) px")
    return ", ".join(parts) or "as is"


def _study_section(data: ReportData) -> dict[str, Any] | None:
    if data.study is None and data.study_dir is None:
        return None
    per_run = {run.name: study_metrics(data.study, run.name) for run in data.runs}
    real = study_metrics(data.study, "real")
    names: list[str] = []
    for metrics in [*per_run.values(), real]:
        for m in metrics:
            if m.name not in names:
                names.append(m.name)
    rows = [{"run": name, "values": [next((m.format() for m in ms if m.name == n), "–") for n in names]}
            for name, ms in [*per_run.items(), *([("real (controls)", real)] if real else [])]]
    study_pngs: list[Path] = []
    if data.study_dir is not None:  # the study's own plots (not the blinded images it stores)
        study_pngs = sorted([*data.study_dir.glob("*.png"), *(data.study_dir / "analysis").glob("*.png")])[:6]
    figures = []
    for n in names:
        if "realism" in n and study_pngs:
            continue  # the study's own realism plot is shown below
        vals = {run: next((m for m in ms if m.name == n), None) for run, ms in [*per_run.items(), ("real", real)]}
        uri = plots.metric_plot(n.removeprefix("study."), {k: v for k, v in vals.items() if v is not None})
        if uri and any(t in n for t in ("realism", "judged", "real_fraction", "fraction")):
            figures.append((n.removeprefix("study."), uri))
    for png in study_pngs:
        uri = plots.image_uri(png, 900)
        if uri:
            figures.append((png.stem.replace("_", " "), uri))
    error = None
    if data.study_dir is not None and (data.study_dir / "error.txt").is_file():
        error = (data.study_dir / "error.txt").read_text(errors="replace").strip()
    other = None
    if data.study:
        other = {k: v for k, v in data.study.items() if not isinstance(v, dict | list)}
    return {"columns": [n.removeprefix("study.") for n in names], "rows": rows, "figures": figures,
            "error": error, "other": other}


NOT_COMPARABLE = ("random weights: not comparable with published numbers or with other extractors "
                  "(the network was not trained; smoke tests only)")


def _fidelity_tables(data: ReportData) -> list[dict[str, Any]]:
    """One table per feature space (runs as rows), titled with its extractor, so every number says
    which network's features it was computed on and numbers of two feature spaces never share a table."""
    groups: dict[tuple[Any, Any], dict[str, dict[str, Metric]]] = {}
    for run in data.runs:
        for extractor, metrics in fidelity_tables(run.eval or {}):
            key = (extractor["name"], extractor["pretrained"])
            groups.setdefault(key, {})[run.name] = {m.name: m for m in metrics}
    tables = []
    for (name, pretrained), runs in groups.items():
        columns = list(dict.fromkeys(n for metrics in runs.values() for n in metrics))
        rows = [{"run": run, **metrics} for run, metrics in runs.items()]
        best = {c: _best(rows, c) for c in columns}
        tables.append({
            "extractor": name, "not_comparable": pretrained is False, "columns": columns,
            "rows": [{"run": r["run"], "cells": [(r[c].format() if c in r else "–", best[c] == r["run"]) for c in columns]}
                     for r in rows],
        })
    return tables


def baseline_changes(data: ReportData, metrics: tuple[str, ...] = ("kid", "fid")) -> list[dict[str, Any]]:
    """Each fine-tuned run's KID/FID beside the base model's (the grid's baseline run): what fine-tuning did.

    Same prompts, seeds and real images for both, so the difference is the fine-tune's. Empty
    without an evaluated baseline.
    """
    base = next((r for r in data.runs if r.baseline and r.eval is not None), None)
    if base is None:
        return []
    base_values = {m.name: m for m in base.metric_list()}
    out = []
    for run in data.runs:
        if run.baseline or run.eval is None:
            continue
        values = {m.name: m for m in run.metric_list()}
        for name in metrics:
            if name not in base_values or name not in values:
                continue
            before, after = base_values[name].value, values[name].value
            change = (after - before) / before if before > 0 else None
            out.append({"run": run.name, "metric": name, "baseline": base.name, "before": cell(before),
                        "after": cell(after), "change": change,
                        "text": f"{name.upper()} {cell(before)} → {cell(after)}"
                                + (f" ({change:+.0%} vs the base model)" if change is not None else "")})
    return out


def build_context(data: ReportData, *, max_samples: int = 8, thumb: int = 128) -> dict[str, Any]:
    columns, rows, kinds = summary_table(data)
    # other feature spaces' numbers (`fid[dinov2]`, `cmmd[clip]`) are shown in their own fidelity tables
    columns = [c for c in columns if "[" not in c]
    plotted = kinds["eval"]  # plots keep them: each plot's title names its extractor
    kinds = {k: [c for c in names if "[" not in c] for k, names in kinds.items()}
    best = {c: _best(rows, c) for c in [*kinds["eval"], *kinds["study"], "val_loss"]}
    table = [{"cells": [(cell(r.get(c)), c in best and best[c] == r["run"] and best[c] is not None) for c in columns],
              "run": r["run"]} for r in rows]
    highlights = [(c, best[c], cell(next(r[c] for r in rows if r["run"] == best[c])), direction(c), _ci_overlap(rows, c, best[c]))
                  for c in kinds["eval"] + kinds["study"] if best.get(c)]

    # plots group the runs of one model family together and give them one hue
    families = {r.name: r.family for r in data.runs}
    colors = plots.run_colors(families)
    by_name = {r.name: r for r in data.runs}
    grouped = [by_name[n] for n in plots.group_by_family(families)]
    loss = plots.curves_plot({r.name: r.loss_curve() for r in grouped}, title="Training loss (smoothed)",
                             ylabel="loss", smooth=True, colors=colors)
    val = plots.curves_plot({r.name: r.val_loss_curve() for r in grouped},
                            title="Validation loss (fixed timesteps and noise)", ylabel="validation loss", smooth=False,
                            colors=colors)
    metric_figs = []
    for name in plotted:
        values = {r.name: next((m for m in r.metric_list() if m.name == name), None) for r in grouped}
        if direction(name) is None and len(plotted) > 12:
            continue
        uri = plots.metric_plot(name, {k: v for k, v in values.items() if v is not None}, colors=colors)
        if uri:
            metric_figs.append((name, direction(name), uri))
    sample_rows, shared = _sample_rows(data, max_samples, thumb)
    config_keys, config_rows = _config_table(data)
    not_evaluated = [r.name for r in data.runs if r.eval is None]
    return {
        "title": data.title,
        "root": str(data.root),
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "is_grid": data.is_grid,
        "source": (data.plan or {}).get("source"),
        "base_yaml": yaml.safe_dump(data.plan["base"], sort_keys=False) if data.plan and data.plan.get("base") else None,
        "runs": data.runs,
        "n_done": sum(1 for r in data.runs if r.status == "done"),
        "failed": [r for r in data.runs if r.error],
        "columns": columns,
        "table": table,
        "highlights": highlights,
        "vs_baseline": baseline_changes(data),
        "baseline_name": next((r.name for r in data.runs if r.baseline), None),
        "way_text": WAY_TEXT,
        "loss_plot": loss,
        "val_plot": val,
        "metric_figs": metric_figs,
        "not_evaluated": not_evaluated,
        "sample_rows": sample_rows,
        "samples_shared": shared,
        "run_names": [r.name for r in data.runs],
        "has_real": bool(data.real_images),
        "config_keys": config_keys,
        "config_rows": config_rows,
        "memorization": _memorization(data, thumb),
        "fidelity_tables": _fidelity_tables(data),
        "not_comparable_text": NOT_COMPARABLE,
        "study": _study_section(data),
    }


def render(context: dict[str, Any]) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("synthcxr.report", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["esc"] = html.escape
    return env.get_template("report.html").render(**context)


def build_report(path: str | Path, out: str | Path | None = None, *, max_samples: int = 8) -> Path:
    """Collect a grid/run folder and write its HTML report (default: `<folder>/report.html`)."""
    data: ReportData = load_report_data(path)
    out_path = Path(out) if out else Path(path) / "report.html"
    html_text = render(build_context(data, max_samples=max_samples))
    atomic_write_text(out_path, html_text)
    log.info("report written to %s (%d run(s), %.1f kB)", out_path, len(data.runs), len(html_text) / 1024)
    return out_path


__all__ = ["build_report", "build_context", "render", "direction", "RunData"]
