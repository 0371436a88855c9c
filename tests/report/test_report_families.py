"""The report groups and colours runs by model family: runs of one family share a hue (shades within it)."""

from __future__ import annotations

import colorsys

from matplotlib.colors import to_rgb

from synthcxr.report import plots


def _hue(color: str) -> float:
    return round(colorsys.rgb_to_hsv(*to_rgb(color))[0], 2)


def test_runs_of_one_family_share_a_hue_and_families_differ():
    colors = plots.run_colors({"sd_full": "Stable Diffusion 1.x/2.x", "sdxl_lora": "Stable Diffusion XL",
                               "sdxl_lora_r32": "Stable Diffusion XL", "sd3_lora": "Stable Diffusion 3 / 3.5"})
    assert _hue(colors["sdxl_lora"]) == _hue(colors["sdxl_lora_r32"])
    assert colors["sdxl_lora"] != colors["sdxl_lora_r32"]
    assert len({_hue(colors[n]) for n in ("sd_full", "sdxl_lora", "sd3_lora")}) == 3


def test_one_family_keeps_one_colour_per_run():
    colors = plots.run_colors({"a": "sd", "b": "sd", "c": None})
    assert len({_hue(c) for c in colors.values()}) == 3


def test_runs_are_grouped_by_family_in_plot_order():
    order = plots.group_by_family({"x1": "sdxl", "s1": "sd", "x2": "sdxl", "s2": "sd"})
    assert order == ["x1", "x2", "s1", "s2"]


def test_report_plots_colour_and_group_by_family(fake_grid, monkeypatch):
    from synthcxr.report import build
    from synthcxr.report.collect import load_report_data

    data = load_report_data(fake_grid)
    runs = [r for r in data.runs]
    for i, run in enumerate(runs):
        run.train_summary["family_label"] = ("Stable Diffusion XL", "Stable Diffusion 1.x/2.x")[i % 2]
    seen = []

    def capture(series, **kwargs):
        seen.append((list(series), kwargs.get("colors")))
        return None

    monkeypatch.setattr(build.plots, "curves_plot", capture)
    build.build_context(data)
    families = {r.name: r.family for r in runs}
    names, colors = seen[0]
    assert names == plots.group_by_family(families)
    assert colors == plots.run_colors(families)
