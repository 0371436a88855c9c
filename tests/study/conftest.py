"""Fixtures for reader-study tests: generated 'real' and 'synthetic' image folders and a study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from study_helpers import make_model_folder, make_real_folder


@dataclass
class StudyFixture:
    db_url: str
    name: str
    invites: dict[str, str]
    admin_token: str | None
    image_dir: Path
    root: Path


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    return {
        "real": make_real_folder(tmp_path / "real"),
        "model_a": make_model_folder(tmp_path / "runs" / "model_a" / "generated", "model_a", seed=3),
        "model_b": make_model_folder(tmp_path / "runs" / "model_b", "model_b", seed=4),
    }


@pytest.fixture
def study(tmp_path, sources, monkeypatch) -> StudyFixture:
    """A mixed study: 4 real + 4 per model, 2 readers, 1 repeat each, 64 px, its own SQLite file."""
    from synthcxr.study.service import create_study

    monkeypatch.delenv("SYNTHCXR_STUDY_SECRET", raising=False)
    db_url = f"sqlite:///{tmp_path / 'study.sqlite3'}"
    created = create_study(
        db_url, "tb-realism", real=sources["real"],
        models=[f"model_a={tmp_path / 'runs' / 'model_a'}", sources["model_b"]],
        per_model=4, real_count=4, readers=2, seed=7, repeats=1, image_size=64,
        questions={"finding": True, "comment": True}, study_dir=tmp_path / "studydir",
        base_url="http://testserver",
    )
    return StudyFixture(db_url, created.name, created.invites, created.admin_token, created.image_dir, tmp_path)


@pytest.fixture
def make_client(study):
    """`make_client()` -> a TestClient on the study database (a fresh app each call = a restart)."""
    from fastapi.testclient import TestClient

    from synthcxr.study.app import create_app
    from synthcxr.study.settings import StudySettings

    clients = []

    def factory() -> TestClient:
        client = TestClient(create_app(StudySettings(db=study.db_url, dir=study.root / "studydir")))
        clients.append(client)
        return client

    yield factory
    for c in clients:
        c.close()


