"""One label vocabulary for generate, evaluate and the study: spellings normalise, unknown labels fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from synthcxr.data.config import CaptionConfig
from synthcxr.data.labels import label_from_finding, parse_label
from synthcxr.errors import DataError, ProblemsError
from synthcxr.evaluate.images import read_image_set
from synthcxr.generate.prompts import read_prompts_csv


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 100).save(path)
    return path


def _generation(root: Path, labels: list[str | None]) -> Path:
    rows = []
    for i, label in enumerate(labels):
        _png(root / f"{i:03d}.png")
        rows.append({"file": f"{i:03d}.png", "prompt": "a chest x-ray", "seed": i, **({"label": label} if label else {})})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("spelling, label", [("Normal", "normal"), ("NORMAL ", "normal"), ("0", "normal"),
                                             ("Tuberculosis", "tuberculosis"), ("TB", "tuberculosis"),
                                             ("ptb", "tuberculosis"), ("1", "tuberculosis"), ("", None)])
def test_spellings_normalise(spelling, label):
    assert parse_label(spelling) == label


def test_finding_gives_the_label_it_states():
    assert label_from_finding("Normal.") == "normal"
    assert label_from_finding("STB,ATB in the right upper field") == "tuberculosis"
    assert label_from_finding("secondary PTB in the bilateral upper fields") == "tuberculosis"
    assert label_from_finding("cardiomegaly") is None


def test_evaluate_reads_every_spelling_from_a_generation_manifest(tmp_path):
    images = read_image_set(_generation(tmp_path / "gen", ["Normal", "Tuberculosis", "TB", "normal"]), "fake")
    assert [it.label for it in images.items] == ["normal", "tuberculosis", "tuberculosis", "normal"]


def test_an_unknown_label_in_a_manifest_names_the_file_and_the_accepted_spellings(tmp_path):
    root = _generation(tmp_path / "gen", ["normal", "pneumonia"])
    with pytest.raises(DataError) as err:
        read_image_set(root, "fake")
    text = err.value.render()
    assert "manifest.jsonl" in text and "row 2" in text and "'pneumonia'" in text and "tb" in text.lower()


def test_label_folders_in_other_spellings(tmp_path):
    for folder in ("Normal", "TB"):
        _png(tmp_path / "real" / folder / f"{folder}.png")
    _png(tmp_path / "real" / "0" / "zero.png")  # a digit folder is not a label
    labels = {it.path.name: it.label for it in read_image_set(tmp_path / "real", "real").items}
    assert labels == {"Normal.png": "normal", "TB.png": "tuberculosis", "zero.png": None}


def test_prompts_csv_normalises_labels_and_reads_the_class_from_a_finding(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("sex,age,label,finding,n\nM,40,TB,,2\nF,30,Normal,,1\nM,50,,PTB in the left lower field,1\nF,20,,normal,1\n")
    rows = read_prompts_csv(csv, CaptionConfig(), default_count=1)
    assert [r.attributes["label"] for r in rows] == ["tuberculosis", "normal", "tuberculosis", "normal"]
    assert rows[0].prompt.endswith("tuberculosis")  # the training captions' own word, not "TB"
    assert rows[2].prompt.endswith("PTB in the left lower field")  # a finding prompt stays as written


def test_prompts_csv_rejects_an_unknown_label_with_file_and_line(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("sex,label\nM,normal\nF,pneumonia\n")
    with pytest.raises(ProblemsError) as err:
        read_prompts_csv(csv, CaptionConfig(), default_count=1)
    text = err.value.render()
    assert f"{csv}:3" in text and "'pneumonia'" in text and "tuberculosis" in text


def test_study_reads_labels_through_the_vocabulary(tmp_path):
    from synthcxr.study.images import _from_manifest

    root = _generation(tmp_path / "gen", ["TB", "Normal"])
    assert [im.label for im in _from_manifest(root / "manifest.jsonl", "run", "synthetic")] == ["tuberculosis", "normal"]
    bad = _generation(tmp_path / "bad", ["covid"])
    with pytest.raises(DataError, match="unknown label 'covid'"):
        _from_manifest(bad / "manifest.jsonl", "run", "synthetic")
