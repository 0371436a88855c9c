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
                page.wait_for_selector("body[data-view]")  # the viewer's key handler is in place
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


def _launch(pw):  # noqa: ANN001, ANN202 - playwright objects
    return pw.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                   "--disable-background-networking",
                                                                   "--disable-component-update"])


def _answer_by_keyboard(page, realism: str) -> None:  # noqa: ANN001 - playwright page
    page.wait_for_selector("body[data-view]")  # the viewer's key handler is in place
    for key in (realism, "r", "h", "n", "Enter"):
        page.keyboard.press(key)


def test_two_tabs_second_answer_is_refused_visibly_and_new_link_asks_first(study):
    sync_api = pytest.importorskip("playwright.sync_api")
    settings = StudySettings(db=study.db_url, dir=study.root / "studydir")
    with background_server(settings) as base, sync_api.sync_playwright() as pw:
        browser = _launch(pw)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            tab1 = context.new_page()
            tab1.goto(study.invites["reader-1"].replace("http://testserver", base))
            tab1.get_by_role("button", name="Start reading").click()
            tab1.wait_for_selector("text=Image 1 of 13")
            tab2 = context.new_page()  # same browser, same session, same image
            tab2.goto(f"{base}/read")
            tab2.wait_for_selector("text=Image 1 of 13")
            _answer_by_keyboard(tab1, "4")
            tab1.wait_for_selector("text=Image 2 of 13")
            _answer_by_keyboard(tab2, "2")
            tab2.wait_for_selector("text=first answer was kept")
            tab2.get_by_role("link", name="Continue").click()
            tab2.wait_for_selector("text=Image 2 of 13")

            admin = browser.new_page()
            admin.goto(f"{base}/admin/login")
            admin.fill("input[name=token]", study.admin_token)
            admin.keyboard.press("Enter")
            admin.wait_for_url(f"{base}/admin")
            admin.get_by_role("link", name=study.name).click()
            admin.locator("tr", has_text="reader-2").get_by_role("link", name="New link").click()
            admin.wait_for_selector("text=stops working")  # a question first: nothing changed yet
            admin.get_by_role("link", name="Cancel").click()
            admin.wait_for_selector("text=Add reader")
            assert "<code>" not in admin.content()
            admin.locator("tr", has_text="reader-2").get_by_role("link", name="New link").click()
            admin.get_by_role("button", name="Make a new link").click()
            admin.wait_for_selector("code")
            assert "/invite/" in admin.inner_text("code")
        finally:
            browser.close()
    with session_scope(study.db_url) as s:
        assert s.scalar(select(func.count()).select_from(Answer)) == 1
        assert s.scalar(select(Answer.realism)) == 4
