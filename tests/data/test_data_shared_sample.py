"""The real 16-image Shenzhen sample (skipped when absent): every file parses and matches the table."""

from __future__ import annotations

import csv

from typer.testing import CliRunner

from synthcxr.cli import app
from synthcxr.data.config import DataConfig
from synthcxr.data.dataset import load_records
from synthcxr.data.preprocess import load_image


def test_shenzhen_sample_parses_cleanly(shared_shenzhen):
    records = load_records(DataConfig(path=shared_shenzhen, resolution=64))
    assert len(records) == 16
    labels = [r.label for r in records]
    assert labels.count("normal") == 8 and labels.count("tuberculosis") == 8
    table = {row["study_id"]: row for row in csv.DictReader((shared_shenzhen / "shenzhen_metadata_subset.csv").open())}
    assert len(table) == 16
    for record in records:
        row = table[record.image_path.name]
        assert record.source == "shenzhen"
        assert record.sex == row["sex"].lower()
        assert record.age == float(row["age"])
        assert record.finding == row["findings"]
        assert record.label == ("normal" if record.image_path.stem.endswith("_0") else "tuberculosis")
        assert "None" not in record.caption


def test_shenzhen_sample_model_input(shared_shenzhen):
    image = load_image(shared_shenzhen / "ChinaSet_AllFiles" / "CXR_png" / "CHNCXR_0025_0.png", resolution=64)
    assert image.size == (64, 64) and image.mode == "RGB"


def test_shenzhen_sample_inspects_cleanly(shared_shenzhen):
    result = CliRunner().invoke(app, ["data", "inspect", str(shared_shenzhen)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "16 image(s)" in result.output and "no problems found" in result.output
