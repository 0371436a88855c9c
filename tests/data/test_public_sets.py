"""NIH ChestX-ray14, CheXpert and MIMIC-CXR-JPG readers on generated fixtures in their layouts."""

from __future__ import annotations

import csv
import time
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthcxr.cli import app
from synthcxr.data.config import DataConfig
from synthcxr.data.dataset import load_records
from synthcxr.data.fixtures import make_fixture_dataset
from synthcxr.data.fixtures_public import fixture_patients
from synthcxr.data.inspect import inspect_data
from synthcxr.data.readers import detect_layouts
from synthcxr.data.splits import record_id, split_records
from synthcxr.errors import ProblemsError

LAYOUTS = ("nih", "chexpert", "mimic")


@pytest.fixture(scope="module")
def public_sets(tmp_path_factory):
    parent = tmp_path_factory.mktemp("public")
    roots = {layout: make_fixture_dataset(parent, layout, n=12, size=64, seed=0, per_patient=3) for layout in LAYOUTS}
    return parent, roots


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_gives_frontal_images_with_patients_and_finding_captions(public_sets, layout):
    _, roots = public_sets
    records = load_records(DataConfig(path=roots[layout], format=layout, resolution=64))
    truth = fixture_patients(layout, 12, 3, 0)
    got: dict[str, list[str]] = defaultdict(list)
    for r in records:
        got[r.patient_id].append(r.extra["relpath"])
        assert r.source == layout
        assert r.sex in ("male", "female") or layout == "mimic" and r.sex is not None
        assert r.age is not None
        assert r.label in ("normal", "abnormal")
        assert "lateral" not in r.extra["relpath"] and "/lat" not in r.extra["relpath"]  # frontal only
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in truth.items()}
    abnormal = [r for r in records if r.label == "abnormal"]
    assert abnormal and all(r.finding and r.finding != "abnormal" for r in abnormal)
    if layout != "mimic":  # mimic's reports become captions; the others use the template with their findings
        assert all(r.finding in r.caption and "abnormal" not in r.caption for r in abnormal)


def test_lateral_views_kept_when_frontal_only_is_off(public_sets):
    _, roots = public_sets
    records = load_records(DataConfig(path=roots["nih"], format="nih", resolution=64, frontal_only=False))
    assert len(records) == 13


def test_chexpert_uncertain_labels_are_not_positive(public_sets):
    _, roots = public_sets
    for r in load_records(DataConfig(path=roots["chexpert"], format="chexpert", resolution=64)):
        for label in r.extra["uncertain"]:
            assert label.lower() not in (r.finding or "")
    assert any(r.extra["uncertain"] for r in load_records(DataConfig(path=roots["chexpert"], resolution=64)))


def test_mimic_report_impression_is_the_caption(public_sets):
    _, roots = public_sets
    records = load_records(DataConfig(path=roots["mimic"], format="mimic", resolution=64))
    with_report = [r for r in records if "report" in r.extra]
    assert len(with_report) == 4  # one report per patient
    assert all(r.caption.startswith("No acute cardiopulmonary process") for r in with_report)
    assert all(r.caption.startswith("a chest x-ray") for r in records if "report" not in r.extra)


def test_auto_detects_all_three_and_split_keeps_patients_together(public_sets, tmp_path):
    parent, _ = public_sets
    assert sorted(name for name, _ in detect_layouts(parent)) == sorted(LAYOUTS)
    records = load_records(DataConfig(path=parent, resolution=64))
    assert len(records) == 36
    groups = split_records(records, DataConfig(path=parent).split.model_copy(update={"val": 0.25, "test": 0.25}),
                           tmp_path / "split.json")
    side = {}
    for name, recs in groups.items():
        for r in recs:
            assert side.setdefault((r.source, r.patient_id), name) == name, record_id(r)
    assert all(groups[s] for s in groups)


def test_missing_images_are_one_problem_naming_the_table(public_sets, tmp_path):
    import shutil

    _, roots = public_sets
    root = tmp_path / "nih"
    shutil.copytree(roots["nih"], root)
    gone = sorted((root / "images_001" / "images").glob("*.png"))[:2]
    for p in gone:
        p.unlink()
    with pytest.raises(ProblemsError) as err:
        load_records(DataConfig(path=root, format="nih", resolution=64))
    problems = err.value.problems
    assert len(problems) == 1
    assert problems[0].file.name == "Data_Entry_2017_v2020.csv" and "2 image(s)" in problems[0].message
    assert "on_error: skip" in problems[0].fix
    assert len(load_records(DataConfig(path=root, format="nih", resolution=64, on_error="skip"))) == 10


def test_patients_have_their_own_anatomy(public_sets):
    """Images of one patient correlate more with each other than with any other patient's."""
    _, roots = public_sets
    records = load_records(DataConfig(path=roots["nih"], format="nih", resolution=64))
    pix = {r.extra["relpath"]: np.asarray(Image.open(r.image_path), np.float64).ravel() for r in records}
    pid = {r.extra["relpath"]: r.patient_id for r in records}
    keys = sorted(pix)
    corr = np.corrcoef(np.stack([pix[k] for k in keys]))
    same = [corr[i, j] for i in range(len(keys)) for j in range(i) if pid[keys[i]] == pid[keys[j]]]
    other = [corr[i, j] for i in range(len(keys)) for j in range(i) if pid[keys[i]] != pid[keys[j]]]
    assert np.mean(same) > np.mean(other) + 0.05
    assert all(np.max(corr[i, [j for j in range(len(keys)) if j != i]]) < 0.999 for i in range(len(keys)))  # never copies


def test_large_table_is_streamed_and_inspected_with_few_images(public_sets, tmp_path):
    """A 100k-row ChestX-ray14 table with 12 images on disk: read in seconds, one summarised problem."""
    import shutil

    _, roots = public_sets
    root = tmp_path / "big"
    shutil.copytree(roots["nih"], root)
    table = root / "Data_Entry_2017_v2020.csv"
    with table.open("a", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        for i in range(100_000):
            writer.writerow([f"{90000000 + i:08d}_000.png", "Effusion|Mass" if i % 3 else "No Finding", 0,
                             90000000 + i, 50, "M", "PA", 2048, 2048, 0.14, 0.14])
    t0 = time.perf_counter()
    report = inspect_data([root], "auto")
    elapsed = time.perf_counter() - t0
    assert len(report.records) == 12
    assert len(report.problems) == 1 and "100000 image(s)" in report.problems[0].message
    assert elapsed < 60, elapsed


def test_make_fixture_cli_writes_each_public_layout(tmp_path):
    runner = CliRunner()
    for layout in LAYOUTS:
        result = runner.invoke(app, ["data", "make-fixture", str(tmp_path), "--layout", layout, "--n", "6",
                                     "--per-patient", "2"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "18 image(s), 9 patient(s)" in result.output
