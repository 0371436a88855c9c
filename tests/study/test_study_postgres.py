"""The same study flow on PostgreSQL (runs when SYNTHCXR_TEST_POSTGRES_URL points at a server,
e.g. postgresql://postgres@127.0.0.1:5432/postgres; each test gets its own fresh database)."""

from __future__ import annotations

import os
import secrets

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from study_helpers import FULL_ANSWER, csrf_of, sign_in_reader, task_of

ADMIN_URL = os.environ.get("SYNTHCXR_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not ADMIN_URL, reason="set SYNTHCXR_TEST_POSTGRES_URL to test against PostgreSQL")


@pytest.fixture
def pg_url():
    psycopg = pytest.importorskip("psycopg")
    admin = make_url(ADMIN_URL)
    name = "synthcxr_test_" + secrets.token_hex(4)
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name).render_as_string(hide_password=False)
    yield url
    from synthcxr.study.db import dispose_engine

    dispose_engine(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_study_on_postgresql(pg_url, sources, tmp_path):
    from fastapi.testclient import TestClient

    from synthcxr.study.app import create_app
    from synthcxr.study.db import Answer, session_scope
    from synthcxr.study.service import analyze_study, create_study, export_ratings, simulate_answers
    from synthcxr.study.settings import StudySettings

    created = create_study(pg_url, "pg", real=sources["real"], models=[sources["model_b"]], per_model=3,
                           real_count=3, readers=2, repeats=1, image_size=32, study_dir=tmp_path / "sd",
                           base_url="http://testserver")
    with TestClient(create_app(StudySettings(db=pg_url, dir=tmp_path / "sd"))) as client:
        page = sign_in_reader(client, created.invites["reader-1"])
        data = {**FULL_ANSWER, "csrf_token": csrf_of(page)}
        task = task_of(page)
        assert "Image 2 of 7" in client.post(f"/read/answer/{task}", data=data).text
        assert client.post(f"/read/answer/{task}", data=data).status_code == 200  # double submit
    with session_scope(pg_url) as s:
        assert s.scalar(select(func.count()).select_from(Answer)) == 1
    assert simulate_answers(pg_url, "pg") == 13
    export_ratings(pg_url, "pg", tmp_path / "r.csv")
    result = analyze_study(pg_url, "pg", tmp_path / "an", n_boot=100)
    assert result["n_answers"] == 14


def test_upgrade_from_0001_gives_existing_studies_a_secret_on_postgresql(pg_url):
    from pathlib import Path

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from synthcxr.study import db
    from synthcxr.study.db import Study, session_scope

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", pg_url)
    with db.get_engine(pg_url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO study (name, created_at, seed, image_dir, image_size, questions, repeats) "
                          "VALUES ('old', now(), 0, '/x', 64, '{}', 0)"))
    db.upgrade(pg_url)
    with session_scope(pg_url) as s:
        keys = list(s.scalars(select(Study.order_key)))
    assert len(keys) == 1 and len(keys[0]) == 64


def test_paired_study_with_calibration_on_postgresql(pg_url, sources, tmp_path):
    """Migration 0003's columns on PostgreSQL: a paired, calibrated, counterbalanced study, its
    answers, the MRMC export and the analysis."""
    from synthcxr.study.analysis import analyze
    from synthcxr.study.service import create_study, mrmc_csv, ratings_table, simulate_answers

    create_study(pg_url, "pg-pairs", real=sources["real"], models=[sources["model_a"], sources["model_b"]],
                 per_model=2, real_count=4, readers=2, image_size=32, design="paired", calibration=1,
                 counterbalance=True, study_dir=tmp_path / "sd")
    assert simulate_answers(pg_url, "pg-pairs") == 2 * 5
    rows = ratings_table(pg_url, "pg-pairs")
    assert sum(r["phase"] == "calibration" for r in rows) == 2 and all(r["image2_id"] for r in rows)
    assert len(mrmc_csv(rows).splitlines()) == 1 + 2 * 4
    assert {m["model"] for m in analyze(rows, n_boot=20)["mrmc"]["models"]} == {"generated", "model_b"}
