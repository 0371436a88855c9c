"""Service layer without HTTP: creating studies, readers, simulation, export, analysis, migrations."""

from __future__ import annotations

import csv

import pytest
from sqlalchemy import inspect, select

from synthcxr.errors import DataError, StudyError
from synthcxr.study.db import Image, Reader, Task, get_engine, session_scope
from synthcxr.study.service import (
    add_reader,
    analyze_study,
    create_study,
    export_ratings,
    reissue_invite,
    simulate_answers,
    study_status,
)


def _orders(db_url: str) -> dict[str, list[str]]:
    with session_scope(db_url) as s:
        return {r.name: [t.image_id for t in r.tasks] for r in s.scalars(select(Reader))}


def test_create_study_samples_groups_and_gives_each_reader_an_order(study):
    with session_scope(study.db_url) as s:
        images = list(s.scalars(select(Image)))
        counts = {}
        for img in images:
            counts[img.model] = counts.get(img.model, 0) + 1
        labels = {img.intended_label for img in images}
    assert counts == {"real": 4, "model_a": 4, "model_b": 4}  # model_a found inside its run directory
    assert labels <= {"normal", "tuberculosis"} and len(labels) == 2  # from manifest rows and NIH file names
    orders = _orders(study.db_url)
    assert len(orders["reader-1"]) == 13 and len(orders["reader-2"]) == 13  # 12 + 1 repeat
    assert sorted(set(orders["reader-1"])) == sorted(set(orders["reader-2"]))
    assert orders["reader-1"] != orders["reader-2"]
    assert set(study.invites) == {"reader-1", "reader-2"} and study.admin_token
    # masks and the unsampled images were left out; the mask folder never shows up
    with session_scope(study.db_url) as s:
        assert not any("mask" in p.lower() for p in s.scalars(select(Image.original_path)))


def test_create_study_errors_are_clear_and_nothing_is_overwritten(tmp_path, sources, study):
    url = study.db_url
    with pytest.raises(StudyError, match="already exists"):
        create_study(url, study.name, real=sources["real"], real_count=2, readers=1, study_dir=tmp_path / "x")
    with pytest.raises(StudyError, match="only 6 images, 50 requested"):
        create_study(url, "big", models=[sources["model_b"]], per_model=50, study_dir=tmp_path / "y")
    with pytest.raises(DataError, match="not found"):
        create_study(url, "missing", real=tmp_path / "nope", study_dir=tmp_path / "z")
    with pytest.raises(StudyError, match="two models"):
        create_study(url, "dup", models=[f"m={sources['model_b']}", f"m={sources['model_a']}"], study_dir=tmp_path / "w")
    with pytest.raises(StudyError, match="no images"):
        create_study(url, "empty", study_dir=tmp_path / "v")
    # the failed attempts left no half-made study behind
    assert [s["study"] for s in study_status(url)] == [study.name]


def test_add_and_reissue_readers(study):
    link = add_reader(study.db_url, study.name, base_url="http://host:1")
    assert link.startswith("http://host:1/invite/")
    with pytest.raises(StudyError, match="already has a reader"):
        add_reader(study.db_url, study.name, "reader-1")
    new = reissue_invite(study.db_url, study.name, "reader-1")
    assert new != study.invites["reader-1"]
    names = [r["reader"] for r in study_status(study.db_url, study.name)[0]["readers"]]
    assert names == ["reader-1", "reader-2", "reader-3"]
    with pytest.raises(StudyError, match="no study called"):
        study_status(study.db_url, "nope")


def test_simulate_export_and_analyze(study, tmp_path):
    assert simulate_answers(study.db_url, study.name, seed=1) == 26
    assert simulate_answers(study.db_url, study.name, seed=1) == 0  # nothing left to answer
    out = export_ratings(study.db_url, study.name, tmp_path / "ratings.csv")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 26
    assert {r["source"] for r in rows} == {"real", "synthetic"}
    assert sum(1 for r in rows if r["repeat_of_position"]) == 2
    with pytest.raises(StudyError, match="already exists"):
        export_ratings(study.db_url, study.name, out)
    result = analyze_study(study.db_url, study.name, tmp_path / "analysis", n_boot=200)
    assert [g["group"] for g in result["groups"]] == ["real", "model_a", "model_b"]
    assert result["intra_reader"]["all"]["n_pairs"] == 2
    assert (tmp_path / "analysis" / "reader_model_heatmap.png").is_file()
    assert study_status(study.db_url, study.name)[0]["readers"][0]["answered"] == 13


def test_migrations_create_the_schema_and_render_for_postgresql(tmp_path, capsys):
    from alembic import command
    from alembic.config import Config

    from synthcxr.study import db

    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    db.upgrade(url)
    db.upgrade(url)  # idempotent
    tables = set(inspect(get_engine(url)).get_table_names())
    assert {"study", "image", "reader", "task", "answer", "web_session", "admin_token", "alembic_version"} <= tables
    # the same migrations produce valid PostgreSQL DDL (offline mode: no server needed)
    cfg = Config()
    cfg.set_main_option("script_location", str(__import__("pathlib").Path(db.__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", "postgresql://user@localhost/study")
    command.upgrade(cfg, "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE answer" in sql and "UNIQUE (task_id)" in sql


def test_tasks_have_unique_positions_and_answers_unique_tasks(study):
    with session_scope(study.db_url) as s:
        for reader in s.scalars(select(Reader)):
            positions = [t.position for t in s.scalars(select(Task).where(Task.reader_id == reader.id))]
            assert sorted(positions) == list(range(len(positions)))


def test_database_refuses_a_second_answer_for_a_task(study):
    from sqlalchemy.exc import IntegrityError

    from synthcxr.study.db import Answer
    from synthcxr.study.questions import AnswerInput
    from synthcxr.study.service import record_answer

    with session_scope(study.db_url) as s:
        task = s.scalar(select(Task).order_by(Task.id))
        answer = AnswerInput(3, True, 2, None, None, 100)
        assert record_answer(s, task, answer) is True
        assert record_answer(s, task, answer) is False
        s.add(Answer(task_id=task.id, realism=1))  # bypassing the service: the constraint still holds
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
