"""Every kind of bad input is reported at once, naming the file and the fix; skip leaves it out."""

from __future__ import annotations

import shutil

import pytest

from synthcxr.data.config import DataConfig
from synthcxr.data.dataset import load_records
from synthcxr.errors import DataError, ProblemsError


def _break_shenzhen(root):
    """Six different problems in one data set; returns {file name: expected words in its message}."""
    images, readings = root / "CXR_png", root / "ClinicalReadings"
    (images / "CHNCXR_0001_0.png").write_bytes(b"this is not a png at all")
    data = (images / "CHNCXR_0002_1.png").read_bytes()
    (images / "CHNCXR_0002_1.png").write_bytes(data[: len(data) // 2])
    (images / "notes.docx").write_bytes(b"PK\x03\x04")
    (readings / "CHNCXR_0003_0.txt").unlink()
    (readings / "CHNCXR_0004_1.txt").write_text("see attached report\n")
    shutil.copy(images / "CHNCXR_0005_0.png", images / "CHNCXR_0099_0.png")
    shutil.copy(readings / "CHNCXR_0005_0.txt", readings / "CHNCXR_0099_0.txt")
    return {
        "CHNCXR_0001_0.png": "not an image",
        "CHNCXR_0002_1.png": "truncated",
        "notes.docx": "not an image file",
        "CHNCXR_0003_0.txt": "missing readings",
        "CHNCXR_0004_1.txt": "unparseable readings",
        "CHNCXR_0099_0.png": "duplicate image",
    }


def test_all_problems_listed_at_once_with_file_and_fix(copy_of):
    root = copy_of("shenzhen")
    expected = _break_shenzhen(root)
    with pytest.raises(ProblemsError) as info:
        load_records(DataConfig(path=root, resolution=64))
    problems = info.value.problems
    assert len(problems) == len(expected)
    by_name = {p.file.name: p for p in problems}
    assert set(by_name) == set(expected)
    for name, words in expected.items():
        assert words in by_name[name].message, (name, by_name[name].message)
        assert by_name[name].fix
    text = str(info.value)
    assert text.startswith("6 problem(s)")
    for name in expected:
        assert name in text
    assert "male 35yrs" in by_name["CHNCXR_0004_1.txt"].fix  # says what a readings file should look like
    assert "CHNCXR_0005_0.png" in by_name["CHNCXR_0099_0.png"].message  # names the original


def test_skip_leaves_bad_files_out(copy_of, caplog):
    root = copy_of("shenzhen")
    _break_shenzhen(root)
    records = load_records(DataConfig(path=root, resolution=64, on_error="skip"))
    assert sorted(r.patient_id for r in records) == ["CHNCXR_0005", "CHNCXR_0006", "CHNCXR_0007", "CHNCXR_0008"]
    assert "CHNCXR_0004_1.txt" in caplog.text


def test_bit_rot_inside_png_is_caught_without_full_decode(copy_of):
    root = copy_of("montgomery")
    path = root / "CXR_png" / "MCUCXR_0001_0.png"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ProblemsError, match="MCUCXR_0001_0.png: corrupt image"):
        load_records(DataConfig(path=root, resolution=64))


def test_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProblemsError, match="empty: empty folder"):
        load_records(DataConfig(path=tmp_path / "empty"))
    native = tmp_path / "ChinaSet_AllFiles"
    (native / "CXR_png").mkdir(parents=True)
    (native / "ClinicalReadings").mkdir()
    with pytest.raises(ProblemsError, match="CXR_png: empty folder"):
        load_records(DataConfig(path=native))
    with pytest.raises(ProblemsError, match="missing: path does not exist"):
        load_records(DataConfig(path=tmp_path / "missing"))


def test_missing_readings_folder(copy_of):
    root = copy_of("montgomery")
    shutil.rmtree(root / "ClinicalReadings")
    with pytest.raises(ProblemsError, match="ClinicalReadings folder not found"):
        load_records(DataConfig(path=root, resolution=64))


def test_skip_with_nothing_left_still_fails(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="no usable images"):
        load_records(DataConfig(path=tmp_path, format="folder", on_error="skip"))


def test_manifest_problems_name_manifest_and_line(copy_of):
    root = copy_of("folder")
    manifest = root / "manifest.csv"
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace("images/img_001.png", "images/nope.png")
    lines[3] = lines[3].replace(",66.0,", ",sixty,")
    lines[4] = lines[4].replace(",F,", ",Q,")
    manifest.write_text("\n".join(lines) + "\n")
    (root / "images" / "img_007.png").write_bytes(b"GIF89a not really")
    with pytest.raises(ProblemsError) as info:
        load_records(DataConfig(path=root, resolution=64))
    messages = [(p.file.name, p.message) for p in info.value.problems]
    assert ("manifest.csv", "line 3: image 'images/nope.png' not found") in messages
    assert any(f == "manifest.csv" and m.startswith("line 4: age 'sixty'") for f, m in messages)
    assert any(f == "manifest.csv" and m.startswith("line 5: sex 'Q'") for f, m in messages)
    assert any(f == "img_007.png" and "not an image" in m for f, m in messages)
    assert len(messages) == 4


def test_manifest_without_file_column(copy_of):
    root = copy_of("folder")
    (root / "manifest.csv").write_text("name,label\nimages/img_000.png,normal\n")
    with pytest.raises(ProblemsError, match="manifest.csv: no file column"):
        load_records(DataConfig(path=root, resolution=64))


def test_broken_jsonl_lines_reported(copy_of):
    root = copy_of("folder")
    (root / "manifest.csv").unlink()
    (root / "manifest.jsonl").write_text('{"file": "images/img_000.png"}\n{"file": broken\n[1, 2]\n')
    with pytest.raises(ProblemsError) as info:
        load_records(DataConfig(path=root, resolution=64))
    assert [p.message.split(" is ")[0] for p in info.value.problems] == ["line 2", "line 3"]


def test_image_with_bad_readings_still_gets_its_pixels_checked(copy_of):
    """A truncated (or duplicate) image whose readings are also missing shows both problems in one pass."""
    root = copy_of("shenzhen")
    images, readings = root / "CXR_png", root / "ClinicalReadings"
    data = (images / "CHNCXR_0002_1.png").read_bytes()
    (images / "CHNCXR_0002_1.png").write_bytes(data[: len(data) // 2])
    (readings / "CHNCXR_0002_1.txt").unlink()
    shutil.copy(images / "CHNCXR_0005_0.png", images / "CHNCXR_0098_0.png")  # a copy without readings
    with pytest.raises(ProblemsError) as info:
        load_records(DataConfig(path=root, resolution=64))
    messages = [(p.file.name, p.message) for p in info.value.problems]
    assert ("CHNCXR_0002_1.txt", "missing readings file for image CHNCXR_0002_1.png") in messages
    assert any(name == "CHNCXR_0002_1.png" and "truncated" in msg for name, msg in messages)
    assert any(name == "CHNCXR_0098_0.png" and "duplicate image" in msg for name, msg in messages)
    records = load_records(DataConfig(path=root, resolution=64, on_error="skip"))
    assert "CHNCXR_0005_0.png" in {r.image_path.name for r in records}  # the original stays usable
