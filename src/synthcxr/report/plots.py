"""Matplotlib figures for the report, returned as PNG data URIs so the HTML needs no other file."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from synthcxr.report.collect import Metric

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def group_by_family(families: dict[str, str | None]) -> list[str]:
    """Run names with the runs of one model family next to each other (families in order of first run)."""
    order = list(dict.fromkeys(families.values()))
    return sorted(families, key=lambda name: order.index(families[name]))


def run_colors(families: dict[str, str | None]) -> dict[str, str]:
    """A colour per run (run name -> model family). When the runs span several families, the runs of one
    family share its hue, in shades from full to light; otherwise each run gets its own colour."""
    from matplotlib.colors import to_hex, to_rgb

    known = list(dict.fromkeys(f for f in families.values() if f is not None))
    if len(known) < 2:
        return {name: COLORS[i % len(COLORS)] for i, name in enumerate(families)}
    groups = [*known, None]
    out = {}
    for g, family in enumerate(groups):
        members = [name for name, f in families.items() if f == family]
        base = to_rgb(COLORS[g % len(COLORS)] if family is not None else "#7f7f7f")
        for j, name in enumerate(members):
            t = 0.6 * j / max(len(members) - 1, 1)  # toward white: same hue, lighter
            out[name] = to_hex(tuple(c + (1 - c) * t for c in base))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def fig_to_uri(fig) -> str:  # noqa: ANN001 - matplotlib Figure
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_uri(path: Path, max_size: int = 160) -> str | None:
    """A thumbnail of an image file as a PNG data URI (None when it cannot be read)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L") if im.mode in ("I", "I;16", "F", "L", "LA", "P") else im.convert("RGB")
            im.thumbnail((max_size, max_size))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average whose window is ~5% of the curve.

    A fixed strong smoothing lags far behind short curves; scaling it to the length keeps the
    smoothed line on top of the raw one for 20 steps and for 20,000.
    """
    alpha = min(0.98, max(0.0, 1.0 - 20.0 / max(len(values), 1)))
    out, avg = [], 0.0
    for t, v in enumerate(values, 1):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha**t) if alpha > 0 else v)
    return out


def curves_plot(series: dict[str, list[tuple[float, float]]], *, title: str, ylabel: str, smooth: bool,
                colors: dict[str, str] | None = None) -> str | None:
    """One line per run (`colors`: run -> colour, e.g. by family); None when no run has any point."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, (name, points) in enumerate(series.items()):
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        color = (colors or {}).get(name) or COLORS[i % len(COLORS)]
        if smooth and len(values) > 10:
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(steps, _smooth(values), color=color, label=name, linewidth=1.6)
        else:
            ax.plot(steps, values, color=color, label=name, linewidth=1.6, marker="o" if len(values) < 30 else None,
                    markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(series) > 6 else 1, loc="best")
    return fig_to_uri(fig)


def metric_plot(name: str, values: dict[str, Metric], colors: dict[str, str] | None = None) -> str | None:
    """Horizontal bars per run with CI whiskers, sorted so the ranking reads top to bottom."""
    values = {k: v for k, v in values.items() if v is not None and math.isfinite(v.value)}
    if not values:
        return None
    plt = _plt()
    names = list(values)
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.2))
    xs = [values[n].value for n in names]
    lo = [max(values[n].value - values[n].low, 0) if values[n].low is not None else 0 for n in names]
    hi = [max(values[n].high - values[n].value, 0) if values[n].high is not None else 0 for n in names]
    if not any(lo) and not any(hi):
        std = [values[n].std or 0 for n in names]
        lo, hi = std, std
    ys = list(range(len(names)))
    ax.barh(ys, xs, xerr=[lo, hi], color=[(colors or {}).get(n) or COLORS[i % len(COLORS)] for i, n in zip(ys, names, strict=True)], alpha=0.85, capsize=3)
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_title(name)
    ax.grid(axis="x", alpha=0.3)
    return fig_to_uri(fig)
