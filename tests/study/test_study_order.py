"""Reading orders come from a secret kept with the study: nobody can predict real vs synthetic at a
position from the code, the seed and a reader name; once stored, an order never changes."""

from __future__ import annotations

import random

from sqlalchemy import select, text
from study_helpers import FULL_ANSWER, csrf_of, sign_in_reader, task_of

from synthcxr.study.db import Image, Reader, Study, Task, dispose_engine, session_scope
from synthcxr.study.service import add_reader, create_study, export_ratings, reissue_invite, study_status


def _group_sequences(db_url: str) -> dict[str, list[str]]:
    """Reader -> the group (real / model name) shown at each position."""
    with session_scope(db_url) as s:
        return {r.name: [t.image.model for t in r.tasks] for r in s.scalars(select(Reader))}


def _path_sequences(db_url: str) -> dict[str, list[str]]:
    with session_scope(db_url) as s:
        return {r.name: [t.image.original_path for t in r.tasks] for r in s.scalars(select(Reader))}


def _old_formula(db_url: str, seed: int, reader: str) -> list[str]:
    """The order the code used to give: random.Random(f"{seed}:{reader}") over images sorted by group."""
    with session_scope(db_url) as s:
        images = sorted(s.execute(select(Image.model, Image.original_path)), key=lambda r: (r[0], r[1]))
    groups = [model for model, _ in images]
    random.Random(f"{seed}:{reader}").shuffle(groups)
    return groups


def test_the_order_cannot_be_predicted_from_seed_and_reader_name(tmp_path, sources):
    urls = []
    for n in range(2):  # the same inputs, seed and reader names twice
        url = f"sqlite:///{tmp_path / f'db{n}.sqlite3'}"
        create_study(url, "s", real=sources["real"], models=[sources["model_a"], sources["model_b"]], per_model=6,
                     real_count=6, readers=3, seed=0, image_size=32, study_dir=tmp_path / f"dir{n}")
        urls.append(url)
    first, second = _path_sequences(urls[0]), _path_sequences(urls[1])
    # the same images were sampled (the seed still decides that) ...
    assert {k: sorted(v) for k, v in first.items()} == {k: sorted(v) for k, v in second.items()}
    # ... but every reader's order differs between the two studies
    for reader in first:
        assert first[reader] != second[reader], reader
        assert _group_sequences(urls[0])[reader] != _old_formula(urls[0], 0, reader)
    # the secret behind the orders is stored with the study, never shown
    with session_scope(urls[0]) as s:
        keys = list(s.scalars(select(Study.order_key)))
    assert len(keys) == 1 and len(keys[0]) >= 64
    export_ratings(urls[0], "s", tmp_path / "r.csv")
    assert keys[0] not in (tmp_path / "r.csv").read_text() and keys[0] not in str(study_status(urls[0]))


def test_stored_orders_are_stable(study, make_client, monkeypatch):
    before = _path_sequences(study.db_url)
    client = make_client()
    page = sign_in_reader(client, study.invites["reader-1"])
    served = []
    for _ in range(3):
        served.append(task_of(page))
        page = client.post(f"/read/answer/{task_of(page)}", data={**FULL_ANSWER, "csrf_token": csrf_of(page)}).text
    add_reader(study.db_url, study.name, "dr-late")
    reissue_invite(study.db_url, study.name, "reader-2")
    monkeypatch.setenv("SYNTHCXR_STUDY_SECRET", "x" * 40)  # another server secret does not reorder anything
    dispose_engine(study.db_url)
    after = _path_sequences(study.db_url)
    assert {k: after[k] for k in before} == before
    with session_scope(study.db_url) as s:
        reader = s.scalar(select(Reader).where(Reader.name == "reader-1"))
        assert [t.public_id for t in reader.tasks[:3]] == served  # served in stored position order
        late = s.scalar(select(Reader).where(Reader.name == "dr-late"))
        assert {t.image_id for t in late.tasks} == {t.image_id for t in reader.tasks}


def test_migration_gives_existing_studies_a_secret(tmp_path):
    from alembic import command
    from alembic.config import Config

    from synthcxr.study import db

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(__import__("pathlib").Path(db.__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0001")  # a database made before this change
    with db.get_engine(url).begin() as conn:
        for name in ("old-a", "old-b"):
            conn.execute(text("INSERT INTO study (name, created_at, seed, image_dir, image_size, questions, repeats) "
                              "VALUES (:n, CURRENT_TIMESTAMP, 0, '/x', 64, '{}', 0)"), {"n": name})
    db.upgrade(url)
    with session_scope(url) as s:
        keys = list(s.scalars(select(Study.order_key)))
    assert len(keys) == 2 and all(k and len(k) >= 64 for k in keys) and keys[0] != keys[1]
    assert add_reader(url, "old-a", "r1").count("/invite/") == 1
    with session_scope(url) as s:
        assert s.scalar(select(Task).limit(1)) is None  # no images: an empty order, but a valid reader


def test_repeats_come_well_after_their_original_whatever_the_key():
    from synthcxr.study.service import _reading_order, new_order_key

    for _ in range(300):
        order = _reading_order([f"img{k}" for k in range(12)], new_order_key(), "reader-1", 2)
        repeats = [(pos, original) for pos, (_, original) in enumerate(order) if original is not None]
        assert len(order) == 14 and len(repeats) == 2
        for pos, original in repeats:
            assert pos - original >= 5, order  # at least 4 other images in between (gap = 12 // 3)
