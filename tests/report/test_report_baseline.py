"""The report states what fine-tuning changed against the grid's baseline (the base model)."""

from __future__ import annotations

import json
import re
import shutil

from synthcxr.report.build import baseline_changes, build_report
from synthcxr.report.collect import load_report_data


def _kid(grid, run: str) -> float:
    return json.loads((grid / "runs" / run / "eval.json").read_text())["fidelity"]["kid"]["mean"]


def test_summary_states_each_runs_kid_change_against_the_base_model(fake_grid, tmp_path):
    html = build_report(fake_grid, tmp_path / "r.html").read_text()
    summary = html.split('<section id="summary">', 1)[1].split("</section>", 1)[0]
    assert 'id="vs-baseline"' in summary and "base model before fine-tuning" in summary
    base = _kid(fake_grid, "baseline")
    for run in ("lora-adamw", "lora-prodigy"):  # evaluated runs (dreambooth-prodigy failed in training)
        change = (_kid(fake_grid, run) - base) / base
        item = re.search(rf"<li><b>{run}</b>: KID ([^<]*)</li>", summary)
        assert item, run
        assert f"({change:+.0%} vs the base model)" in item.group(1)
    assert "<b>dreambooth-prodigy</b>" not in summary
    # the samples section names the baseline column as the untrained model
    samples = html.split('<section id="samples">', 1)[1].split("</section>", 1)[0]
    assert "<b>baseline</b> is the base model before fine-tuning" in samples


def test_no_baseline_statement_without_an_evaluated_baseline(fake_grid, tmp_path):
    grid = tmp_path / "grid"
    shutil.copytree(fake_grid, grid)
    (grid / "runs" / "baseline" / "eval.json").unlink()
    assert baseline_changes(load_report_data(grid)) == []
    assert 'id="vs-baseline"' not in build_report(grid).read_text()
