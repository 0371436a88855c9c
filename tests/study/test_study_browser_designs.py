"""Headless Chromium: the paired design with its calibration block and the view tools, and the
admin dashboard (live progress, analysis tables and plots, drill-down, exports)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import func, select
from study_helpers import make_model_folder, make_real_folder

from synthcxr.study.db import Answer, Reader, Task, session_scope
from synthcxr.study.questions import AnswerInput
from synthcxr.study.server import background_server
from synthcxr.study.service import create_study, record_answer, simulate_answers
from synthcxr.study.settings import StudySettings

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs Debian chromium at /usr/bin/chromium"),
]


def _launch(pw):  # noqa: ANN001, ANN202 - playwright objects
    return pw.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                   "--disable-background-networking",
                                                                   "--disable-component-update"])


def _watch(page) -> list[str]:  # noqa: ANN001 - playwright page
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return errors


def _shot(page, tmp_path: Path, name: str) -> None:  # noqa: ANN001 - playwright page
    shot = Path(os.environ.get("SYNTHCXR_SCREENSHOT_DIR", tmp_path)) / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000


@pytest.fixture
def folders(tmp_path):
    return {"real": make_real_folder(tmp_path / "real", n=12),
            "a": make_model_folder(tmp_path / "a", "model_a", n=8, seed=3),
            "b": make_model_folder(tmp_path / "b", "model_b", n=8, seed=4)}


def test_paired_study_with_calibration_and_view_tools(tmp_path, folders):
    sync_api = pytest.importorskip("playwright.sync_api")
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    created = create_study(url, "pairs", real=folders["real"], models=[folders["a"], folders["b"]], per_model=3,
                           real_count=6, readers=2, image_size=64, design="paired", calibration=2,
                           study_dir=tmp_path / "dir", base_url="http://testserver")
    settings = StudySettings(db=url, dir=tmp_path / "dir")
    with background_server(settings) as base, sync_api.sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            errors = _watch(page)
            page.goto(created.invites["reader-1"].replace("http://testserver", base))
            page.get_by_role("button", name="Start reading").click()
            for n in (1, 2):
                page.wait_for_selector(f"text=Calibration {n} of 2")
                page.wait_for_selector(f"text=Pair {n} of 8")
                for img in ("#xray", "#xray2"):
                    assert page.eval_on_selector(img, "i => i.complete && i.naturalWidth") == 64
                if n == 1:
                    _shot(page, tmp_path, "paired_calibration.png")
                page.wait_for_selector("body[data-view]")
                page.keyboard.press("1")  # left is synthetic
                page.keyboard.press("h")
                page.keyboard.press("Enter")
                page.wait_for_selector("#feedback")
                assert "The synthetic image was on the" in page.inner_text("#feedback")
                if n == 1:
                    _shot(page, tmp_path, "paired_feedback.png")
                else:
                    assert "the study itself starts now" in page.content()
                page.get_by_role("link", name="Continue").click()
            page.wait_for_selector("text=Pair 3 of 8")
            page.wait_for_selector("body[data-view]")
            assert "Calibration" not in page.inner_text("body")
            # view tools act on both images alike
            page.get_by_role("button", name="Bone").click()
            for img in ("#xray", "#xray2"):
                style = page.get_attribute(img, "style")
                assert "brightness(0.714" in style and "contrast(2.33" in style, style
            page.keyboard.press("i")
            assert all("invert(1)" in page.get_attribute(i, "style") for i in ("#xray", "#xray2"))
            assert page.get_attribute("#invert", "aria-pressed") == "true"
            page.keyboard.press("f")  # full resolution: one image pixel per screen pixel
            width = page.eval_on_selector("#xray", "i => i.getBoundingClientRect().width")
            assert abs(width - 64) < 1.0, width
            _shot(page, tmp_path, "paired_viewer_tools.png")
            page.keyboard.press("0")
            assert "invert" not in page.get_attribute("#xray", "style")
            for n in (3, 4, 5):  # main pairs: answers go straight on, no feedback
                page.wait_for_selector("body[data-view]")  # the viewer's key handler is in place
                page.keyboard.press("2")
                page.keyboard.press("m")
                page.keyboard.press("Enter")
                page.wait_for_selector(f"text=Pair {n + 1} of 8")
                assert page.url == f"{base}/read"
            assert not errors, errors
        finally:
            browser.close()
    with session_scope(url) as s:
        answers = list(s.scalars(select(Answer)))
        assert [a.picked for a in answers] == ["left", "left", "right", "right", "right"]
        assert all(a.client_ms and a.client_ms > 0 for a in answers)


def test_admin_dashboard_live_progress_analysis_drilldown_exports(tmp_path, folders):
    sync_api = pytest.importorskip("playwright.sync_api")
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    created = create_study(url, "dash", real=folders["real"], models=[folders["a"], folders["b"]], per_model=4,
                           real_count=4, readers=["r1", "r2", "r3"], image_size=64, calibration=1,
                           study_dir=tmp_path / "dir", base_url="http://testserver")
    simulate_answers(url, "dash")
    with session_scope(url) as s:  # r3 has not started: remove their simulated answers
        r3 = s.scalar(select(Reader).where(Reader.name == "r3"))
        for task in r3.tasks:
            s.delete(task.answer)
    settings = StudySettings(db=url, dir=tmp_path / "dir")
    with background_server(settings) as base, sync_api.sync_playwright() as pw:
        browser = _launch(pw)
        try:
            context = browser.new_context(viewport={"width": 1300, "height": 900}, accept_downloads=True)
            page = context.new_page()
            errors = _watch(page)
            page.goto(f"{base}/admin/login")
            page.fill("input[name=token]", created.admin_token)
            page.keyboard.press("Enter")
            page.wait_for_url(f"{base}/admin")
            page.get_by_role("link", name="dash").click()
            page.wait_for_selector("#mrmc-table")
            mrmc = page.inner_text("#mrmc-table")
            assert "\na\t" in mrmc and "\nb\t" in mrmc and "TOST p" in mrmc
            assert "real" in page.inner_text("#groups-table") and page.is_visible("#time-summary")
            for img in page.query_selector_all(".plots img"):
                assert img.evaluate("i => i.complete && i.naturalWidth") > 100
            assert len(page.query_selector_all(".plots img")) >= 3
            row = page.locator("tr[data-reader=r3]")
            assert "0 / 13" in row.inner_text()
            _shot(page, tmp_path, "dashboard.png")
            # live progress: r3 answers two images; the row updates without a reload
            with session_scope(url) as s:
                tasks = list(s.scalars(select(Task).join(Reader).where(Reader.name == "r3").order_by(Task.position)))
                for task in tasks[:2]:
                    s.commit()
                    record_answer(s, task, AnswerInput(3, True, 2, None, None, 1000))
            page.locator("tr[data-reader=r3] .answered", has_text="2 / 13").wait_for(timeout=12_000)
            assert "updated" in page.inner_text("#live")
            # exports
            with page.expect_download() as dl:
                page.click("#export-mrmc")
            text = Path(dl.value.path()).read_text()
            assert text.splitlines()[0] == "reader,case,modality,truth,rating"
            with page.expect_download() as dl:
                page.click("#export-csv")
            assert "phase" in Path(dl.value.path()).read_text().splitlines()[0]
            resp = page.request.get(f"{base}/admin/study/dash/analysis.json")
            assert json.loads(resp.text())["mrmc"]["models"]
            # refresh, then drill down into one reader
            page.click("#refresh")
            page.wait_for_selector("#mrmc-table")
            page.get_by_role("link", name="r1", exact=True).click()
            page.wait_for_selector("#answers")
            assert "calibration" in page.inner_text("#answers") and page.is_visible("#reader-stats")
            assert len(page.query_selector_all("#answers tbody tr")) == 13
            _shot(page, tmp_path, "dashboard_reader.png")
            assert not errors, errors
        finally:
            browser.close()
    with session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(Answer)) == 2 * 13 + 2
