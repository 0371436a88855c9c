"""The HTML report: self-contained, every section present, graceful when data is missing."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from synthcxr.errors import SynthCXRError
from synthcxr.report.build import build_report, direction


def img_sources(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)


def test_grid_report_is_self_contained_and_complete(fake_grid, tmp_path):
    out = build_report(fake_grid, tmp_path / "r.html")
    html = out.read_text()
    # no network: no external scripts, styles, fonts or images
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script" not in html
    sources = img_sources(html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for name in ["baseline", "dreambooth-prodigy", "lora-adamw", "lora-prodigy"]:
        assert name in html
    # loss + validation curves, metric plots, study plots, sample grid with real column
    for alt in ["training loss curves", "validation loss curves", "fid", "real image", "sample"]:
        assert f'alt="{alt}"' in html, alt
    assert 'id="summary-table"' in html and "Reader study" in html
    # 3 trained+baseline runs with samples x 3 prompts/seeds, plus real column
    assert html.count('alt="sample"') == 3 * 3
    assert "simulated training failure" in html  # the failure section shows the error
    assert "best fid" in html  # ranking highlights
    assert "realism" in html
    assert "flagged" in html and "feature cosine 0.97" in html  # memorization pairs with their scores
    for column in ["fid", "kid", "precision", "recall", "ms_ssim.synthetic", "memorization.ssim_max", "utility_auc.real"]:
        assert f"<th>{column}</th>" in html, column


def test_report_degrades_when_sections_are_missing(fake_grid, tmp_path):
    grid = tmp_path / "grid"
    shutil.copytree(fake_grid, grid)
    (grid / "runs" / "lora-adamw" / "eval.json").unlink()
    shutil.rmtree(grid / "study")
    html = build_report(grid).read_text()
    assert (grid / "report.html").is_file()
    assert "not evaluated: dreambooth-prodigy, lora-adamw" in html
    assert "no reader study for these runs" in html


def test_single_run_and_bare_training_dir(fake_grid, tmp_path):
    html = build_report(fake_grid / "runs" / "lora-prodigy", tmp_path / "one.html").read_text()
    assert "run report: lora-prodigy" in html and 'alt="training loss curves"' in html
    train_dir = fake_grid / "runs" / "lora-prodigy" / "train"
    html = build_report(train_dir, tmp_path / "train.html").read_text()
    assert 'alt="training loss curves"' in html
    assert "no generated images yet" in html
    assert "not evaluated" in html


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SynthCXRError, match="no grid or run found"):
        build_report(tmp_path)
    with pytest.raises(SynthCXRError, match="folder not found"):
        build_report(tmp_path / "nope")


def test_metric_directions():
    assert direction("fid") == "low" and direction("kid") == "low"
    assert direction("precision") == "high" and direction("study.realism") == "high"
    assert direction("ms_ssim.synthetic") == "real" and direction("ms_ssim.real") is None
    assert direction("memorization.ssim_max") == "low" and direction("utility_auc.real") == "high"


def test_report_cli(fake_grid, tmp_path):
    from synthcxr.cli import main

    target = tmp_path / "cli.html"
    main(["report", str(fake_grid), "--out", str(target)])
    assert target.is_file() and Path(target).stat().st_size > 1000
