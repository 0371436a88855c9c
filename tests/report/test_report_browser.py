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
