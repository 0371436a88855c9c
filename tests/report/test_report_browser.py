"""The report opened in headless Chromium: it renders, every image loads, nothing errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synthcxr.report.build import build_report

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
SCREENSHOTS_ENV = "SYNTHCXR_SCREENSHOTS"
"""Folder to keep the screenshot in (e.g. a CI artifact folder); default: the test's temporary folder."""


@pytest.mark.browser
def test_report_renders_in_chromium_without_broken_images(fake_grid, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); browser test skipped")
    sync_api = pytest.importorskip("playwright.sync_api")
    report = build_report(fake_grid, tmp_path / "report.html")
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(report.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({alt: e.alt, complete: e.complete, w: e.naturalWidth}))")
            shot_dir = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
            shot_dir.mkdir(parents=True, exist_ok=True)
            shot = shot_dir / "report_grid.png"
            page.screenshot(path=str(shot), full_page=True)
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            table_rows = page.eval_on_selector_all("#summary-table tbody tr", "els => els.length")
        finally:
            browser.close()
    assert not errors, errors
    assert images, "the report shows no images"
    broken = [i for i in images if not i["complete"] or i["w"] == 0]
    assert not broken, broken
    assert all(u.startswith(("file://", "data:")) for u in requests), [u for u in requests if not u.startswith(("file:", "data:"))]
    assert {"Summary", "Configurations", "Loss curves", "Samples", "Metrics", "Memorization", "Reader study"} <= set(headings)
    assert table_rows == 4
    assert shot.stat().st_size > 10_000


@pytest.mark.browser
def test_fidelity_tables_per_extractor_render_in_chromium(fake_grid, tmp_path):
    """Evaluations with three feature spaces (one with random weights): a titled table each, in the browser."""
    import json
    import shutil

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); browser test skipped")
    sync_api = pytest.importorskip("playwright.sync_api")
    grid = shutil.copytree(fake_grid, tmp_path / "grid")
    evals = [p for p in grid.rglob("*.json") if "fidelity" in p.read_text()]
    assert evals
    for path in evals:
        data = json.loads(path.read_text())
        data.update({"extractor": {"name": "inception", "pretrained": True}, "extractor_pretrained": True,
                     "fidelity_by_extractor": [{"extractor": {"name": "dinov2", "pretrained": False},
                                                **data["fidelity"]}],
                     "cmmd": {"extractor": {"name": "clip", "pretrained": True}, "value": 0.5, "ci": [0.4, 0.6]}})
        path.write_text(json.dumps(data))
    report = build_report(grid, tmp_path / "report.html")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(report.as_uri(), wait_until="load")
            titles = page.eval_on_selector_all(".fidelity-title", "els => els.map(e => e.textContent)")
            rows = page.eval_on_selector_all(".fidelity-table", "els => els.map(e => e.querySelectorAll('tbody tr').length)")
            marks = page.eval_on_selector_all(".not-comparable", "els => els.map(e => e.offsetHeight > 0)")
            summary = page.eval_on_selector_all("#summary-table thead th", "els => els.map(e => e.textContent)")
        finally:
            browser.close()
    assert not errors, errors
    assert titles == ["Fidelity in inception features", "Fidelity in dinov2 features", "Fidelity in clip features"]
    assert rows == [len(evals)] * 3 and marks == [True]  # only the random-weight table is marked, and it shows
    assert "fid" in summary and not any("[" in h for h in summary)
