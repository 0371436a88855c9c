"""Diversity is ranked by closeness to the real set's MS-SSIM: the lowest value favours noise."""

from __future__ import annotations

from synthcxr.report.build import _best, direction
from synthcxr.report.collect import Metric


def _row(run: str, synthetic: float, real: float) -> dict:
    return {"run": run, "ms_ssim.synthetic": Metric("ms_ssim.synthetic", synthetic, synthetic - 0.02, synthetic + 0.02),
            "ms_ssim.real": Metric("ms_ssim.real", real)}


def test_diversity_best_is_closest_to_real_not_lowest():
    # the demo's case: noise-like images (0.158) against real images at 0.894
    rows = [_row("noise", 0.158, 0.894), _row("close", 0.86, 0.894), _row("collapsed", 0.99, 0.894)]
    assert direction("ms_ssim.synthetic") == "real"
    assert _best(rows, "ms_ssim.synthetic") == "close"


def test_diversity_ranking_uses_each_runs_own_real_value_and_skips_runs_without_one():
    rows = [_row("a", 0.50, 0.60), _row("b", 0.85, 0.86), {"run": "c", "ms_ssim.synthetic": Metric("m", 0.3)}]
    assert _best(rows, "ms_ssim.synthetic") == "b"

