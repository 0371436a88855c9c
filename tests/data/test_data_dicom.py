"""DICOM display pipeline: modality LUT (rescale), VOI (window / LUT), MONOCHROME1, bit depths."""

from __future__ import annotations

import numpy as np
import pytest

from synthcxr.data.config import DataConfig
from synthcxr.data.dataset import load_records
from synthcxr.data.dicom import dicom_to_float
from synthcxr.data.fixtures import write_dicom
from synthcxr.data.preprocess import load_image
from synthcxr.errors import ProblemsError


def _row(values, dtype=np.uint16):
    """A 2 x N image whose columns are the given stored values."""
    return np.tile(np.asarray(values, dtype=dtype), (2, 1))


def test_16_bit_plain_scales_by_bit_depth(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", _row([0, 16384, 65535]), bits_stored=16)
    assert dicom_to_float(path)[0] == pytest.approx([0, 0.25, 1], abs=1e-4)


def test_12_bit_scales_by_bits_stored_not_container(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", _row([0, 1024, 4095]), bits_stored=12)
    assert dicom_to_float(path)[0] == pytest.approx([0, 0.25, 1], abs=1e-4)


def test_monochrome1_is_inverted(tmp_path):
    stored = _row([0, 1024, 4095])
    mono1 = dicom_to_float(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", bits_stored=12))
    mono2 = dicom_to_float(write_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2", bits_stored=12))
    assert mono1[0] == pytest.approx([1, 0.75, 0], abs=1e-4)
    assert mono1 == pytest.approx(1 - mono2, abs=1e-6)
    # and through the model-input path, the brightest stored value becomes black
    rgb = np.asarray(load_image(tmp_path / "m1.dcm", resolution=8, resize="pad"))
    assert rgb.shape == (8, 8, 3)


def test_rescale_is_applied_before_the_window(tmp_path):
    # modality value = 2 * stored - 1000; the window [0, 2000] is in modality units
    stored = _row([250, 500, 1000, 1500, 2000])
    path = write_dicom(tmp_path / "a.dcm", stored, bits_stored=12, slope=2.0, intercept=-1000.0, window=(1000.0, 2000.0))
    assert dicom_to_float(path)[0] == pytest.approx([0, 0, 0.5, 1, 1], abs=2e-3)


def test_window_clips_and_stretches(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", _row([10000, 20000, 30000, 40000, 60000]), bits_stored=16, window=(30000.0, 20000.0))
    assert dicom_to_float(path)[0] == pytest.approx([0, 0, 0.5, 1, 1], abs=2e-3)


def test_window_then_monochrome1_inversion(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", _row([20000, 30000, 40000]), photometric="MONOCHROME1", bits_stored=16,
                       window=(30000.0, 20000.0))
    assert dicom_to_float(path)[0] == pytest.approx([1, 0.5, 0], abs=2e-3)


def test_voi_lut_sequence(tmp_path):
    lut = (np.linspace(0, 1, 4096) ** 2 * 65535).round().astype(np.int64)  # a gamma curve, 16-bit output
    path = write_dicom(tmp_path / "a.dcm", _row([0, 2048, 4095]), bits_stored=12, voi_lut=lut)
    out = dicom_to_float(path)[0]
    assert out == pytest.approx([0, (2048 / 4095) ** 2, 1], abs=1e-3)


def test_signed_pixels(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", _row([-32768, 0, 32767], dtype=np.int16), bits_stored=16, signed=True)
    assert dicom_to_float(path)[0] == pytest.approx([0, 32768 / 65535, 1], abs=1e-4)


def test_generated_dicoms_match_their_source_image(fixture_sets):
    """All four display conventions of the fixture set decode to the same kind of image (bright body)."""
    records = sorted(load_records(DataConfig(path=fixture_sets["dicom"], resolution=64)), key=lambda r: r.patient_id)
    means = [float(r.pixels.mean()) for r in records]
    assert max(means) - min(means) < 0.05, means  # MONOCHROME1 / rescaled / LUT ones are not inverted or dark
    photometric = {r.extra["photometric"] for r in records}
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert 12 in {r.extra["bits_stored"] for r in records}


def test_unreadable_dicoms_are_all_reported(copy_of):
    root = copy_of("dicom")
    (root / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"garbage" * 10)
    with open(root / "manifest.csv", "a") as fh:
        fh.write("broken.dcm,normal,normal\n")
    (root / "IM0001.dcm").write_bytes((root / "IM0001.dcm").read_bytes()[:400])  # truncated inside the pixel data
    with pytest.raises(ProblemsError) as info:
        load_records(DataConfig(path=root, resolution=64))
    text = str(info.value)
    assert "broken.dcm: unreadable DICOM" in text
    assert "IM0001.dcm: unreadable DICOM" in text and "truncated" in text
    assert len(info.value.problems) == 2
    kept = load_records(DataConfig(path=root, resolution=64, on_error="skip"))
    assert len(kept) == 7


def test_kept_pixels_are_shrunk_to_the_resolution_and_inspect_keeps_none(tmp_path):
    stored = np.tile(np.linspace(0, 4095, 256), (128, 1))
    write_dicom(tmp_path / "big.dcm", stored, bits_stored=12)
    (record,) = load_records(DataConfig(path=tmp_path, resolution=64))
    assert record.pixels.shape == (64, 128)  # shorter side = resolution, aspect kept
    assert float(record.pixels[:, 0].mean()) < 0.02 and float(record.pixels[:, -1].mean()) > 0.98
    from synthcxr.data.inspect import inspect_data

    report = inspect_data([tmp_path])
    assert not report.problems and report.records[0].pixels is None
    # without kept pixels the file itself is decoded again for the model input
    gray = np.asarray(load_image(report.records[0], resolution=32, resize="pad"))[..., 0]
    assert gray[16, 0] < 10 and gray[16, -1] > 245 and gray[0].max() == 0
