"""Paired two-alternative design, the calibration block with feedback, Latin-square model blocks,
the MRMC export and the new analysis sections."""

from __future__ import annotations

import csv
import io
from collections import Counter

import pytest
from sqlalchemy import select
from study_helpers import csrf_of, make_model_folder, make_real_folder, sign_in_reader, task_of

from synthcxr.errors import StudyError
from synthcxr.study.db import Study, session_scope
from synthcxr.study.designs import block_order, williams_square
from synthcxr.study.service import create_study, export_ratings, ratings_table, simulate_answers


@pytest.fixture
def folders(tmp_path):
    return {"real": make_real_folder(tmp_path / "real", n=16),
            "a": make_model_folder(tmp_path / "a", "a", n=10, seed=3),
            "b": make_model_folder(tmp_path / "b", "b", n=10, seed=4),
            "c": make_model_folder(tmp_path / "c", "c", n=10, seed=5)}


def _create(tmp_path, folders, name="s", models=("a", "b"), **kw):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    args = dict(real=folders["real"], models=[folders[m] for m in models], per_model=6, real_count=8, readers=4,
                image_size=32, study_dir=tmp_path / "dir", base_url="http://testserver")
    args.update(kw)
    return url, create_study(url, name, **args)


def _tasks(url, name="s"):
    with session_scope(url) as s:
        study = s.scalar(select(Study).where(Study.name == name))
        return {r.name: [(t.phase, t.block, t.image, t.image2) for t in r.tasks] for r in study.readers}


def test_williams_square_is_balanced():
    for n in (2, 3, 4, 5):
        rows = williams_square(n)
        assert len(rows) == (n if n % 2 == 0 else 2 * n)
        for pos in range(n):  # every treatment equally often at every position
            assert len(set(Counter(row[pos] for row in rows).values())) == 1
        follows = Counter((row[k], row[k + 1]) for row in rows for k in range(n - 1))
        assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1  # carry-over balanced
    assert block_order(["x", "y"], 0) != block_order(["x", "y"], 1)


def test_paired_design_every_reader_every_pair_sides_balanced(tmp_path, folders):
    url, created = _create(tmp_path, folders, design="paired")
    assert created.n_tasks_per_reader == 12
    tasks = _tasks(url)
    pair_sets = set()
    for reader, rows in tasks.items():
        assert all(phase == "main" and img2 is not None for phase, _, _, img2 in rows)
        pairs = {frozenset((a.id, b.id)) for _, _, a, b in rows}
        assert len(pairs) == 12
        pair_sets.add(frozenset(pairs))
        for _, block, left, right in rows:  # one real, one synthetic, labels matched where known
            assert {left.source, right.source} == {"real", "synthetic"}
            syn, real = (left, right) if left.source == "synthetic" else (right, left)
            assert block == syn.model and syn.role == real.role == "study"
            assert syn.intended_label == real.intended_label
        left_synthetic = sum(left.source == "synthetic" for _, _, left, _ in rows)
        assert left_synthetic == 6, f"{reader}: synthetic on the left in {left_synthetic} of 12"
    assert len(pair_sets) == 1  # the same cases for every reader (needed for MRMC)
    # orders differ between readers
    assert len({tuple(a.id for _, _, a, _ in rows) for rows in tasks.values()}) == 4


def test_paired_refuses_repeats_and_needs_real(tmp_path, folders):
    with pytest.raises(StudyError, match="repeats"):
        _create(tmp_path, folders, design="paired", repeats=1)
    with pytest.raises(StudyError, match="needs real images"):
        _create(tmp_path, folders, design="paired", real=None)
    with pytest.raises(StudyError, match="did you mean 'paired'"):
        _create(tmp_path, folders, design="pairs")


def test_counterbalanced_blocks_follow_the_latin_square(tmp_path, folders):
    url, _ = _create(tmp_path, folders, models=("a", "b", "c"), counterbalance=True, readers=6, per_model=4,
                     real_count=6)
    tasks = _tasks(url)
    firsts = Counter()
    for n, (_reader, rows) in enumerate(sorted(tasks.items(), key=lambda kv: int(kv[0].split("-")[1]))):
        blocks = [b for _, b, _, _ in rows]
        order = list(dict.fromkeys(blocks))
        assert order == block_order(["a", "b", "c"], n)
        # contiguous blocks, each with its model's images and its share (2) of the real ones
        assert all(blocks[k] == order[k // 6] for k in range(len(blocks)))
        for model in order:
            members = [img for _, b, img, _ in rows if b == model]
            assert sum(i.model == model for i in members) == 4 and sum(i.source == "real" for i in members) == 2
        firsts[order[0]] += 1
    assert firsts == {"a": 2, "b": 2, "c": 2}


def test_calibration_block_feedback_and_exclusion(tmp_path, folders):
    from fastapi.testclient import TestClient

    from synthcxr.study.app import create_app
    from synthcxr.study.settings import StudySettings

    url, created = _create(tmp_path, folders, calibration=3)
    tasks = _tasks(url)
    calib_ids = set()
    for rows in tasks.values():
        phases = [p for p, *_ in rows]
        assert phases == ["calibration"] * 3 + ["main"] * (len(rows) - 3)
        calib_ids |= {img.id for p, _, img, _ in rows if p == "calibration"}
        assert not calib_ids & {img.id for p, _, img, _ in rows if p == "main"}  # never a study image
    assert len(calib_ids) == 3
    client = TestClient(create_app(StudySettings(db=url, dir=tmp_path / "dir")))
    page = sign_in_reader(client, created.invites["reader-1"])
    assert "Calibration 1 of 3" in page
    first = task_of(page)
    data = {"csrf_token": csrf_of(page), "realism": "3", "choice": "real", "confidence": "1", "elapsed_ms": "900"}
    resp = client.post(f"/read/answer/{first}", data=data, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == f"/read/feedback/{first}"
    feedback = client.get(resp.headers["location"]).text
    assert "This image was" in feedback and ("real" in feedback or "synthetic" in feedback)
    for _ in range(2):
        page = client.get("/read").text
        client.post(f"/read/answer/{task_of(page)}", data={**data, "csrf_token": csrf_of(page)})
    page = client.get("/read").text
    assert "Calibration" not in page and "Image 4 of" in page
    main_task = task_of(page)
    client.post(f"/read/answer/{main_task}", data={**data, "csrf_token": csrf_of(page)}, follow_redirects=False)
    # a study image's truth is never shown, answered or not
    assert client.get(f"/read/feedback/{main_task}").status_code == 404
    assert client.get(f"/read/feedback/{task_of(client.get('/read').text)}").status_code == 404
    rows = ratings_table(url, "s")
    assert [r["phase"] for r in rows] == ["calibration"] * 3 + ["main"]
    from synthcxr.study.analysis import analyze

    result = analyze(rows, n_boot=50)
    assert result["n_calibration"] == 3 and result["n_first_showings"] == 1
    client.close()


def test_paired_answers_export_and_mrmc(tmp_path, folders):
    from fastapi.testclient import TestClient

    from synthcxr.study.app import create_app
    from synthcxr.study.settings import StudySettings

    url, created = _create(tmp_path, folders, design="paired", calibration=1, readers=3)
    client = TestClient(create_app(StudySettings(db=url, dir=tmp_path / "dir")))
    page = sign_in_reader(client, created.invites["reader-1"])
    assert "Which one is synthetic?" in page and "/right" in page
    task = task_of(page)
    assert client.get(f"/read/image/{task}").content != client.get(f"/read/image/{task}/right").content
    bad = client.post(f"/read/answer/{task}", data={"csrf_token": csrf_of(page), "picked": "middle", "confidence": "2"})
    assert bad.status_code == 400 and "left or the right" in bad.text
    resp = client.post(f"/read/answer/{task}", data={"csrf_token": csrf_of(page), "picked": "left", "confidence": "2"},
                       follow_redirects=False)
    assert resp.headers["location"] == f"/read/feedback/{task}"
    assert "The synthetic image was on the" in client.get(resp.headers["location"]).text
    # a reader always answering "left" scores exactly 50% on the main pairs
    while (page := client.get("/read").text) and task_of(page):
        client.post(f"/read/answer/{task_of(page)}", data={"csrf_token": csrf_of(page), "picked": "left",
                                                           "confidence": "1"})
    client.close()
    simulate_answers(url, "s")
    rows = ratings_table(url, "s")
    mine = [r for r in rows if r["reader"] == "reader-1" and r["phase"] == "main"]
    assert len(mine) == 12 and sum(r["correct"] for r in mine) == 6
    assert all(r["picked"] == "left" and r["synthetic_side"] in ("left", "right") for r in mine)
    out = export_ratings(url, "s", tmp_path / "mrmc.csv", mrmc=True)
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(table[0]) == ["reader", "case", "modality", "truth", "rating"]
    assert len(table) == 3 * 12  # calibration left out
    assert {r["modality"] for r in table} == {"a", "b"}
    from synthcxr.study.analysis import analyze

    result = analyze(rows, n_boot=50)
    assert result["design"] == "paired"
    assert {m["model"] for m in result["mrmc"]["models"]} == {"a", "b"}
    assert result["paired"]["readers"][0]["reader"] == "reader-1" and result["paired"]["readers"][0]["correct"] == 0.5


def test_single_design_mrmc_export_and_mixed_model(tmp_path, folders):
    url, _ = _create(tmp_path, folders, readers=3)
    simulate_answers(url, "s")
    rows = ratings_table(url, "s")
    out = export_ratings(url, "s", tmp_path / "mrmc.csv", mrmc=True)
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    # per model: its 6 images (truth 1) and the 8 real controls (truth 0), for each of 3 readers
    for model in ("a", "b"):
        mine = [r for r in table if r["modality"] == model]
        assert len(mine) == 3 * 14 and sum(r["truth"] == "1" for r in mine) == 3 * 6
    from synthcxr.study.analysis import analyze

    result = analyze(rows, n_boot=50)
    models = {m["model"]: m for m in result["mrmc"]["models"]}
    assert set(models) == {"a", "b"} and all(0 <= m["ci"][0] <= m["auc"] <= m["ci"][1] <= 1 for m in models.values())
    mixed = {g["group"]: g for g in result["mixed_model"]["groups"]}
    assert set(mixed) == {"real", "a", "b"} and "diff_vs_real" in mixed["a"]
    assert result["time"]["n"] == len(rows)


def test_max_image_size_caps_the_automatic_size(tmp_path):
    from study_helpers import make_image_folder

    real = make_image_folder(tmp_path / "r", 3, 80, seed=1)
    syn = make_image_folder(tmp_path / "m", 3, 80, seed=2, manifest=True)
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    small = create_study(url, "x", real=real, models=[syn], per_model=3, real_count=3, readers=1,
                         study_dir=tmp_path / "d", max_image_size=64)
    large = create_study(url, "y", real=real, models=[syn], per_model=3, real_count=3, readers=1,
                         study_dir=tmp_path / "d", max_image_size=1024)
    assert small.blinding["image_size"] == 64
    assert large.blinding["image_size"] == 80  # never enlarged past the smallest source


def test_migration_from_0002_keeps_studies_single(tmp_path):
    """A database made before the designs existed: its study reads as single-image, its tasks as
    main tasks, its images as study images, and a new reader still gets an order."""
    from pathlib import Path

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from synthcxr.study import db
    from synthcxr.study.db import Image, Task
    from synthcxr.study.service import add_reader

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0002")
    with db.get_engine(url).begin() as conn:
        conn.execute(text("INSERT INTO study (name, created_at, seed, image_dir, image_size, questions, repeats, "
                          "order_key) VALUES ('old', CURRENT_TIMESTAMP, 0, '/x', 64, '{}', 0, 'k')"))
        for n in range(3):
            conn.execute(text("INSERT INTO image (id, study_id, source, model, original_path, sha256) "
                              f"VALUES ('i{n}', 1, 'real', 'real', '/x/{n}.png', 'h')"))
    db.upgrade(url)
    add_reader(url, "old", "r1")
    with session_scope(url) as s:
        assert s.scalar(select(Study)).design == "single"
        assert {i.role for i in s.scalars(select(Image))} == {"study"}
        tasks = list(s.scalars(select(Task)))
        assert len(tasks) == 3 and {t.phase for t in tasks} == {"main"} and all(t.image2_id is None for t in tasks)


def test_pairs_match_label_and_sex_where_known(tmp_path):
    """Real Shenzhen-like set with clinical readings (sex) and a model whose manifest names the sex:
    every pair shares label and sex while a real image of both is available."""
    import json

    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    root = tmp_path / "ChinaSet_AllFiles"
    (root / "CXR_png").mkdir(parents=True)
    (root / "ClinicalReadings").mkdir()
    for i in range(8):  # labels 0/1 alternate, sexes in pairs: every (label, sex) twice
        stem = f"CHNCXR_{i + 1:04d}_{i % 2}"
        PILImage.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "CXR_png" / f"{stem}.png")
        sex = "male" if (i // 2) % 2 == 0 else "female"
        (root / "ClinicalReadings" / f"{stem}.txt").write_text(f"{sex} 3{i}yrs\n{'normal' if i % 2 == 0 else 'PTB'}\n")
    model = tmp_path / "gen"
    model.mkdir()
    rows = []
    for i in range(8):
        PILImage.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(model / f"{i:05d}.png")
        rows.append({"file": f"{i:05d}.png", "label": "tuberculosis" if i % 2 else "normal",
                     "sex": "female" if i < 4 else "male"})
    (model / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    create_study(url, "sx", real=root, models=[model], per_model=4, real_count=8, readers=1, image_size=32,
                 design="paired", study_dir=tmp_path / "d", seed=1)
    with session_scope(url) as s:
        study = s.scalar(select(Study))
        images = {i.id: i for i in study.images}
        pairs = study.options["pairs"]
    assert len(pairs) == 4
    for p in pairs:
        real, syn = images[p["real"]], images[p["synthetic"]]
        assert real.intended_label == syn.intended_label == p["label"]
        assert p["sex"] in ("male", "female")  # known on both sides and equal
