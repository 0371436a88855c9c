"""Readers on generated data in every native layout, combined sets and manifests."""

from __future__ import annotations

import json

import pytest

from synthcxr.data.config import DataConfig
from synthcxr.data.dataset import load_records
from synthcxr.data.fixtures import fixture_attributes
from synthcxr.data.readers import detect_layouts

TRUTH = fixture_attributes(8, 0)


def _by_index(records):
    return sorted(records, key=lambda r: r.image_path.name)


@pytest.mark.parametrize(("layout", "source", "prefix"), [("shenzhen", "shenzhen", "CHNCXR"), ("montgomery", "montgomery", "MCUCXR")])
def test_native_layout_reads_every_attribute(fixture_sets, layout, source, prefix):
    records = _by_index(load_records(DataConfig(path=fixture_sets[layout], resolution=64)))
    assert len(records) == 8
    for record, truth in zip(records, TRUTH, strict=True):
        assert record.source == source
        assert record.patient_id == f"{prefix}_{truth['index'] + 1:04d}"
        assert record.sex == truth["sex"]
        assert record.age == pytest.approx(truth["age"], abs=0.01)
        assert record.label == truth["label"]
        assert record.finding == truth["finding"]  # "Normal." / "NORMAL" spellings normalised
        assert record.caption.startswith("a chest x-ray of a ")
        assert "None" not in record.caption


def test_format_auto_accepts_root_parent_and_image_folder(fixture_sets):
    root = fixture_sets["shenzhen"]
    assert detect_layouts(root) == [("shenzhen", root)]
    assert detect_layouts(root / "CXR_png") == [("shenzhen", root)]
    found = dict((name, path) for name, path in detect_layouts(fixture_sets["parent"]))
    assert found == {"shenzhen": root, "montgomery": fixture_sets["montgomery"]}
    assert detect_layouts(fixture_sets["folder"]) == [("folder", fixture_sets["folder"])]
    assert detect_layouts(fixture_sets["dicom"]) == [("dicom", fixture_sets["dicom"])]


def test_montgomery_and_shenzhen_combined(fixture_sets):
    cfg = DataConfig(path=[fixture_sets["montgomery"], fixture_sets["shenzhen"]], resolution=64)
    records = load_records(cfg)
    assert sorted({r.source for r in records}) == ["montgomery", "shenzhen"]
    assert len(records) == 16
    # one parent folder holding both sets gives the same records
    assert {r.key for r in load_records(DataConfig(path=fixture_sets["parent"], resolution=64))} == {r.key for r in records}


def test_explicit_format_overrides_detection(fixture_sets):
    records = load_records(DataConfig(path=fixture_sets["parent"], format="montgomery", resolution=64))
    assert {r.source for r in records} == {"montgomery"}


def test_folder_with_csv_manifest(fixture_sets):
    records = load_records(DataConfig(path=fixture_sets["folder"], resolution=64))
    assert len(records) == 8
    suffixes = sorted({r.image_path.suffix for r in records})
    assert suffixes == [".jpg", ".png", ".tif"]
    by_name = {r.image_path.name: r for r in records}
    first, follow_up = by_name["img_000.png"], by_name["img_001.png"]
    assert first.patient_id == follow_up.patient_id == "P001"
    assert (first.sex, first.age, first.label) == ("male", TRUTH[0]["age"], "normal")
    assert follow_up.label == "tuberculosis" and follow_up.finding == TRUTH[1]["finding"]
    assert first.extra["relpath"] == "images/img_000.png"


def test_folder_with_jsonl_manifest_and_captions(copy_of):
    root = copy_of("folder")
    (root / "manifest.csv").unlink()
    rows = [
        {"file": "images/img_000.png", "caption": "a frontal chest radiograph", "label": "0", "patient_id": "A", "sex": "F", "age": "044Y"},
        {"path": "images/img_002.jpg", "label": "TB", "patient_id": "B", "finding": "cavity", "site": "clinic 3"},
    ]
    manifest = root / "labels.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_records(DataConfig(path=root, manifest=manifest, resolution=64))
    assert [r.patient_id for r in records] == ["A", "B"]
    a, b = records
    assert a.caption == "a frontal chest radiograph"  # manifest captions are kept
    assert (a.sex, a.age, a.label) == ("female", 44.0, "normal")
    assert b.caption == "a chest x-ray, tuberculosis"  # no sex/age: dropped, no "None"
    assert b.extra["site"] == "clinic 3"
    templated = load_records(DataConfig(path=root, manifest=manifest, resolution=64,
                                        captions={"use_manifest_captions": False}))
    assert templated[0].caption == "a chest x-ray of a 44 year old female, normal"


def test_folder_without_manifest_uses_file_names(copy_of):
    root = copy_of("folder")
    (root / "manifest.csv").unlink()
    records = load_records(DataConfig(path=root, resolution=64))
    assert len(records) == 8
    assert {r.patient_id for r in records} == {f"img_{i:03d}" for i in range(8)}
    assert all(r.caption == "a chest x-ray" for r in records)


def test_dicom_folder_reads_header_attributes(fixture_sets):
    records = _by_index(load_records(DataConfig(path=fixture_sets["dicom"], resolution=64)))
    assert len(records) == 8
    for record, truth in zip(records, TRUTH, strict=True):
        assert record.source == "dicom"
        assert record.patient_id == f"PAT{truth['index']:04d}"
        assert record.sex == truth["sex"]
        assert record.age == pytest.approx(truth["age"], abs=0.01)
        assert record.label == truth["label"]  # from the manifest next to the DICOMs
        assert record.pixels is not None and record.pixels.dtype.name == "float32"
        assert record.pixels.min() >= 0.0 and record.pixels.max() <= 1.0


def test_csv_manifest_quoting_bom_and_crlf(copy_of):
    root = copy_of("folder")
    (root / "manifest.csv").write_bytes(
        '\ufefffile,caption,Label,Age\r\n'
        'images/img_000.png,"a chest x-ray, frontal view\r\nwith a note",TB,044Y\r\n'
        'images/img_002.jpg,,normal,\r\n'.encode()
    )
    first, second = load_records(DataConfig(path=root, resolution=64))
    assert first.caption == "a chest x-ray, frontal view with a note"  # one line for the tokenizer
    assert (first.label, first.age) == ("tuberculosis", 44.0)
    assert second.caption == "a chest x-ray, normal" and second.age is None
