"""A reader in headless Chromium: open the invite, rate five images by keyboard, reload, continue."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import func, select

from synthcxr.study.db import Answer, session_scope
from synthcxr.study.server import background_server
from synthcxr.study.settings import StudySettings

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs Debian chromium at /usr/bin/chromium"),
]


def _answers(db_url: str) -> int:
    with session_scope(db_url) as s:
        return s.scalar(select(func.count()).select_from(Answer))


def test_reader_rates_with_keyboard_and_continues_after_reload(study, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    settings = StudySettings(db=study.db_url, dir=study.root / "studydir")
    with background_server(settings) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(study.invites["reader-1"].replace("http://testserver", base))
            page.get_by_role("button", name="Start reading").click()
            page.wait_for_url(f"{base}/read")
            for n in range(1, 6):
                page.wait_for_selector(f"text=Image {n} of 13")
                assert page.eval_on_selector("#xray", "img => img.complete && img.naturalWidth") == 64
                # Enter before answering shows what is missing and stays on the image
                if n == 1:
                    page.keyboard.press("Enter")
                    assert page.is_visible("#missing")
                    assert "Image 1 of 13" in page.content()
                    page.keyboard.press("+")  # zoom in: the viewer transforms the image
                    assert "scale(1.25)" in page.get_attribute("#xray", "style")
                page.keyboard.press(str(1 + n % 5))
                page.keyboard.press("r" if n % 2 else "s")
                page.keyboard.press("h")
                page.keyboard.press("n")
                page.keyboard.press("Enter")
                page.wait_for_selector(f"text=Image {n + 1} of 13")
            assert _answers(study.db_url) == 5
            page.reload()
            page.wait_for_selector("text=Image 6 of 13")
            fill = page.eval_on_selector(".fill", "el => el.style.width")
            assert fill.startswith("38.46")  # 5 of 13 done
            shot = Path(os.environ.get("SYNTHCXR_SCREENSHOT_DIR", tmp_path)) / "reader_viewer.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            assert not errors, errors  # no CSP violations or script errors
        finally:
            browser.close()
    with session_scope(study.db_url) as s:
        stored = list(s.scalars(select(Answer)))
    assert {a.confidence for a in stored} == {3} and {a.finding for a in stored} == {"normal"}
    assert all(a.client_ms is not None and a.client_ms > 0 for a in stored)
