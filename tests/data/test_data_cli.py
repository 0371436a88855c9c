"""`synthcxr data ...` through the real CLI app."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from synthcxr.cli import app, main

runner = CliRunner()
WIDE = {"COLUMNS": "400"}  # keep file paths on one line in rich tables


def test_inspect_clean_data_set(fixture_sets, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["data", "inspect", str(fixture_sets["parent"]), "--json", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "16 image(s), 16 patient(s)" in result.output
    assert "no problems found" in result.output
    report = json.loads(out.read_text())
    assert report["counts"]["source"] == {"montgomery": 8, "shenzhen": 8}
    assert report["counts"]["label"] == {"normal": 8, "tuberculosis": 8}
    assert report["counts"]["sex"] == {"female": 8, "male": 8}
    assert sum(report["counts"]["age band"].values()) == 16
    assert report["problems"] == []


def test_inspect_lists_every_problem_and_exits_non_zero(copy_of, tmp_path):
    root = copy_of("shenzhen")
    (root / "CXR_png" / "CHNCXR_0001_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "ClinicalReadings" / "CHNCXR_0002_1.txt").write_text("")
    (root / "ClinicalReadings" / "CHNCXR_0003_0.txt").unlink()
    shutil.copy(root / "CXR_png" / "CHNCXR_0004_1.png", root / "CXR_png" / "CHNCXR_0010_1.png")
    shutil.copy(root / "ClinicalReadings" / "CHNCXR_0004_1.txt", root / "ClinicalReadings" / "CHNCXR_0010_1.txt")
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["data", "inspect", str(root), "--json", str(out)], env=WIDE)
    assert result.exit_code == 1
    assert "4 problem(s)" in result.output
    for name in ("CHNCXR_0001_0.png", "CHNCXR_0002_1.txt", "CHNCXR_0003_0.txt", "CHNCXR_0010_1.png"):
        assert name in result.output
    problems = json.loads(out.read_text())["problems"]
    assert {p["file"].rsplit("/", 1)[-1] for p in problems} == {"CHNCXR_0001_0.png", "CHNCXR_0002_1.txt",
                                                              "CHNCXR_0003_0.txt", "CHNCXR_0010_1.png"}
    assert all(p["fix"] for p in problems)
    assert json.loads(out.read_text())["images"] == 5  # the 5 clean ones of 9 are still counted


def test_inspect_dicom_and_format_option(fixture_sets):
    result = runner.invoke(app, ["data", "inspect", str(fixture_sets["dicom"]), "--format", "dicom"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "8 image(s)" in result.output
    bad = runner.invoke(app, ["data", "inspect", str(fixture_sets["dicom"]), "--format", "nifti"], env=WIDE)
    assert bad.exit_code != 0


def test_split_command_writes_and_reuses(fixture_sets, tmp_path):
    out = tmp_path / "split.json"
    args = ["data", "split", str(fixture_sets["folder"]), "--out", str(out), "--val", "0.2", "--test", "0.2", "--seed", "1"]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["settings"] == {"val": 0.2, "test": 0.2, "seed": 1}
    by_patient = {}
    for row in saved["images"]:
        by_patient.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in by_patient.values())  # P001 and P004 have two images each
    before = out.read_bytes()
    assert runner.invoke(app, args, env=WIDE).exit_code == 0
    assert out.read_bytes() == before


def test_split_from_config_file(fixture_sets, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  path: {fixture_sets['montgomery']}\n  split: {{val: 0.25, test: 0.25, seed: 0}}\n")
    out = tmp_path / "split.csv"
    result = runner.invoke(app, ["data", "split", "--config", str(config), "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = out.read_text().splitlines()
    assert rows[0] == "id,patient_id,source,label,split" and len(rows) == 9


def test_captions_command(fixture_sets, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = runner.invoke(app, ["data", "captions", str(fixture_sets["shenzhen"]), "--instance", "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "a sks chest x-ray" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all(r["caption"].startswith("a sks chest x-ray of a ") for r in rows)


def test_make_fixture_command(tmp_path):
    result = runner.invoke(app, ["data", "make-fixture", str(tmp_path), "--layout", "montgomery", "--n", "4", "--size", "32"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "MontgomerySet" / "CXR_png").glob("*.png"))) == 4
    assert runner.invoke(app, ["data", "make-fixture", str(tmp_path), "--layout", "nifti"]).exit_code != 0


def test_console_entry_point_exit_status(copy_of, capsys):
    root = copy_of("montgomery")
    (root / "ClinicalReadings" / "MCUCXR_0001_0.txt").write_text("Patient's Sex: M\n")
    with pytest.raises(SystemExit) as info:
        main(["data", "inspect", str(root)])
    assert info.value.code == 1
    with pytest.raises(SystemExit) as info:  # a load with on_error: fail prints the problems, no traceback
        main(["data", "split", str(root), "--out", str(root.parent / "split.json")])
    assert info.value.code == 2
    assert "MCUCXR_0001_0.txt" in capsys.readouterr().err
    assert not (root.parent / "split.json").exists()
