"""Concurrent readers on loopback: every answer stored exactly once (small run; full 20x50 is slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "study_load.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("study_load", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(result: dict, readers: int, answers: int) -> None:
    assert result["errors"] == []
    assert result["stored"] == readers * answers == result["distinct_tasks"]
    assert result["per_reader_min"] == result["per_reader_max"] == answers
    assert result["double_submits"] == readers * (answers // 10)
    assert result["answers_per_s"] > 0 and result["post_p95_ms"] > 0


def test_small_concurrent_load(tmp_path):
    _check(_load_module().run_load(readers=5, answers=10, workdir=tmp_path), 5, 10)


@pytest.mark.slow
def test_full_load_20_readers_x_50_answers(tmp_path):
    _check(_load_module().run_load(readers=20, answers=50, workdir=tmp_path), 20, 50)


def test_small_concurrent_load_paired(tmp_path):
    _check(_load_module().run_load(readers=4, answers=10, workdir=tmp_path, design="paired"), 4, 10)


@pytest.mark.slow
def test_full_load_paired_20_readers_x_50_answers(tmp_path):
    """The paired design under load: 20 readers x 50 pairs -> exactly 1,000 answers stored."""
    result = _load_module().run_load(readers=20, answers=50, workdir=tmp_path, design="paired")
    _check(result, 20, 50)
    assert result["stored"] == 1000


def test_simultaneous_submits_of_one_task_store_one_answer(study):
    """Two tabs / a double click racing on a live server: the unique constraint keeps one answer."""
    import threading

    import httpx
    from sqlalchemy import func, select
    from study_helpers import FULL_ANSWER, csrf_of, task_of

    from synthcxr.study.db import Answer, session_scope
    from synthcxr.study.server import background_server
    from synthcxr.study.settings import StudySettings

    with background_server(StudySettings(db=study.db_url, dir=study.root / "studydir")) as base:
        link = study.invites["reader-1"].replace("http://testserver", "")
        with httpx.Client(base_url=base) as first:
            page = first.get(link)
            first.post(link, data={"csrf_token": csrf_of(page.text)})
            page = first.get("/read").text
            cookies = dict(first.cookies)
        data = {**FULL_ANSWER, "csrf_token": csrf_of(page)}
        barrier = threading.Barrier(8)
        statuses: list[int] = []

        def tab(realism: int) -> None:
            with httpx.Client(base_url=base, cookies=cookies, follow_redirects=False) as client:
                barrier.wait(timeout=30)
                statuses.append(client.post(f"/read/answer/{task_of(page)}", data={**data, "realism": str(realism)}).status_code)

        threads = [threading.Thread(target=tab, args=(1 + n % 5,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    with session_scope(study.db_url) as s:
        assert s.scalar(select(func.count()).select_from(Answer)) == 1
        kept = s.scalar(select(Answer.realism))
    # tabs that sent the kept answer continue; the others are told their first answer was kept
    assert sorted(statuses) == sorted(303 if 1 + n % 5 == kept else 409 for n in range(8))
