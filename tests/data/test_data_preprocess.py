"""Any input image -> square 3-channel model input; geometry, bit depths, colour modes, no default flip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from synthcxr.data.config import DataConfig
from synthcxr.data.dataset import XrayDataset, load_records
from synthcxr.data.preprocess import load_image, to_model_tensor
from synthcxr.data.records import XrayRecord


def _gray(img) -> np.ndarray:
    arr = np.asarray(img)
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0].astype(int)


def _save(tmp_path, name, arr, mode=None):
    path = tmp_path / name
    Image.fromarray(arr, mode=mode).save(path)
    return path


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("l8.png", lambda v: Image.fromarray(np.full((32, 32), round(v * 255), np.uint8), mode="L")),
        ("l16.png", lambda v: Image.fromarray(np.full((32, 32), round(v * 65535), np.uint16))),
        ("l12in16.png", lambda v: Image.fromarray(np.r_[np.full((31, 32), round(v * 4095)), np.full((1, 32), 4095)].astype(np.uint16))),
        ("rgb.jpg", lambda v: Image.new("RGB", (32, 32), (round(v * 255),) * 3)),
        ("rgba.png", lambda v: Image.new("RGBA", (32, 32), (round(v * 255),) * 3 + (255,))),
        ("p.png", lambda v: Image.new("L", (32, 32), round(v * 255)).convert("P")),
        ("f.tif", lambda v: Image.fromarray(np.full((32, 32), v, np.float32), mode="F")),
        ("l16.tif", lambda v: Image.fromarray(np.full((32, 32), round(v * 65535), np.uint16))),
    ],
)
def test_every_input_mode_gives_the_same_gray_level(tmp_path, name, make):
    path = tmp_path / name
    make(0.5).save(path)
    out = _gray(load_image(path, resolution=16))
    assert out.shape == (16, 16)
    assert abs(int(np.median(out)) - 128) <= 3, (name, np.median(out))


def test_transparent_areas_become_black(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 16:, 3] = 255  # left half transparent
    out = _gray(load_image(_save(tmp_path, "a.png", rgba, "RGBA"), resolution=32))
    assert out[:, :14].max() == 0 and out[:, 18:].min() >= 195


def test_crop_keeps_the_centre_and_pad_keeps_everything(tmp_path):
    wide = np.zeros((64, 128), np.uint8)
    wide[:, 32:96] = 255  # the centre square is white, the outer quarters black
    path = _save(tmp_path, "wide.png", wide, "L")
    cropped = _gray(load_image(path, resolution=32, resize="crop"))
    assert cropped.shape == (32, 32) and cropped[:, 2:30].min() >= 250
    padded = _gray(load_image(path, resolution=32, resize="pad"))
    assert padded.shape == (32, 32)
    assert padded[:7].max() == 0 and padded[-7:].max() == 0  # black bars top and bottom
    assert padded[12:20, 10:22].min() >= 250 and padded[12:20, :4].max() <= 5


def test_downscaling_is_antialiased(tmp_path):
    stripes = np.zeros((256, 256), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes average to mid gray, not aliased black/white
    out = _gray(load_image(_save(tmp_path, "s.png", stripes, "L"), resolution=32))
    assert 110 <= out.mean() <= 145 and out.std() < 20


def test_model_tensor_range_and_shape(tmp_path):
    arr = np.zeros((16, 16), np.uint8)
    arr[:, 8:] = 255
    tensor = to_model_tensor(load_image(_save(tmp_path, "bw.png", arr, "L"), resolution=16))
    assert tuple(tensor.shape) == (3, 16, 16) and str(tensor.dtype) == "torch.float32"
    assert float(tensor.min()) == -1.0 and float(tensor.max()) == 1.0


def test_record_pixels_are_used_when_present():
    pixels = np.zeros((20, 40), np.float32)
    pixels[:, :20] = 1.0
    record = XrayRecord(image_path=None, patient_id="p", source="dicom", pixels=pixels)
    out = _gray(load_image(record, resolution=8, resize="pad"))
    assert out[4, 1] >= 250 and out[4, 6] <= 5 and out[0].max() == 0


def test_no_horizontal_flip_unless_configured(fixture_sets, tmp_path):
    left_bright = np.zeros((64, 64), np.uint8)
    left_bright[:, :32] = 255
    path = _save(tmp_path, "lat.png", left_bright, "L")
    record = XrayRecord(image_path=path, patient_id="p", source="folder", caption="c")
    cfg = DataConfig(path=tmp_path, resolution=16)
    plain = XrayDataset([record] * 20, cfg)
    assert all(float(plain[i]["pixel_values"][0, :, :8].mean()) > 0.9 for i in range(20))
    flipped = XrayDataset([record] * 40, DataConfig(path=tmp_path, resolution=16, hflip=True))
    lefts = [float(flipped[i]["pixel_values"][0, :, :8].mean()) for i in range(40)]
    assert any(v > 0.9 for v in lefts) and any(v < -0.9 for v in lefts)
    assert all(v > 0.9 for v in (float(x["pixel_values"][0, :, :8].mean()) for x in XrayDataset([record] * 5, cfg.model_copy(update={"hflip": True}), train=False)))


def test_dataset_items_on_generated_data(fixture_sets):
    cfg = DataConfig(path=fixture_sets["montgomery"], resolution=32)
    records = load_records(cfg)
    ds = XrayDataset(records, cfg)
    item = ds[1]
    assert tuple(item["pixel_values"].shape) == (3, 32, 32)
    assert -1.0 <= float(item["pixel_values"].min()) < float(item["pixel_values"].max()) <= 1.0
    assert item["caption"] == records[1].caption and item["key"] == records[1].key
    # the 12-bit-in-16-bit Montgomery fixture is as bright as its 8-bit neighbours
    means = [float(ds[i]["pixel_values"].mean()) for i in range(len(ds))]
    assert max(means) - min(means) < 0.2, means
