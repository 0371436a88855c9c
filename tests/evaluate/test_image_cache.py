"""The per-run decoded-image cache: one decode per file, identical numbers, bounded memory."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import synthcxr.evaluate.images as images_mod
from synthcxr.evaluate.imagecache import DecodedImageCache
from synthcxr.evaluate.images import load_gray, read_decoded, resize_rgb
from synthcxr.evaluate.run import EvaluateConfig, evaluate

FAST = {"extractor": {"name": "random", "device": "cpu"}, "diversity": {"image_size": 64, "pairs": 20},
        "utility": {"image_size": 32, "epochs": 1, "n_boot": 20, "seeds": 1}, "memorization": {"ssim_size": 32, "top_pairs": 3},
        "fidelity": {"ci_groups": 10, "kid_subsets": 10}}
#: Parts of the results that legitimately differ between two runs (time, config, the cache's own report).
RUN_SPECIFIC = {"created", "timings_s", "config", "image_cache", "cache_dir"}


@pytest.fixture()
def count_decodes(monkeypatch) -> Counter:
    """Counts every decode of an image file, by path, wherever in the evaluation it happens."""
    calls: Counter = Counter()
    real_decode = images_mod.decode_image

    def counting(data: bytes, source="<bytes>"):
        calls[str(source)] += 1
        return real_decode(data, source)

    monkeypatch.setattr(images_mod, "decode_image", counting)
    return calls


def _run(image_sets: dict[str, Path], out_dir: Path, image_cache_mb: int) -> dict:
    cfg = EvaluateConfig(real=image_sets["real"], fake=image_sets["fake"], test=image_sets["test"],
                         out=out_dir / "eval.json", cache_dir=out_dir / "features", image_cache_mb=image_cache_mb, **FAST)
    evaluate(cfg)
    text = (out_dir / "eval.json").read_text().replace(str(out_dir), "<out>")
    return json.loads(text)


def test_full_run_decodes_each_file_once_and_matches_uncached_numbers(image_sets, tmp_path, count_decodes):
    all_files = {str(p) for root in image_sets.values() for p in root.rglob("*.png")}

    on = _run(image_sets, tmp_path / "on", image_cache_mb=64)
    assert {"fidelity", "diversity", "memorization", "utility"} <= set(on)
    assert "label" in on["utility"]["conditioning"]
    assert set(count_decodes) == all_files
    assert set(count_decodes.values()) == {1}, count_decodes.most_common(3)
    assert on["image_cache"]["decodes"] == len(all_files) and on["image_cache"]["hits"] > len(all_files)
    assert on["image_cache"]["evictions"] == 0

    count_decodes.clear()
    off = _run(image_sets, tmp_path / "off", image_cache_mb=0)
    assert off["image_cache"] is None
    assert max(count_decodes.values()) >= 4  # what the cache saves: features, MS-SSIM, SSIM, classifier each decode
    for key in set(on) | set(off):
        if key not in RUN_SPECIFIC:
            assert on[key] == off[key], key
    for pair in on["memorization"]["top_pairs"]:  # the saved side-by-side images are byte-identical too
        name = Path(pair["image"]).name
        assert (tmp_path / "on/eval_pairs" / name).read_bytes() == (tmp_path / "off/eval_pairs" / name).read_bytes()


def test_lru_stays_within_its_byte_budget_and_forgets_the_oldest(tmp_path, count_decodes):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(paths[-1])
    cache = DecodedImageCache(max_bytes=3 * 32 * 32)  # room for three 32 x 32 grayscale images
    for p in paths:
        read_decoded(p, cache)
    assert cache.bytes <= cache.max_bytes and cache.evictions == 1
    read_decoded(paths[3], cache)  # most recent: still there
    read_decoded(paths[0], cache)  # the oldest was dropped: decoded again
    assert count_decodes[str(paths[3])] == 1 and count_decodes[str(paths[0])] == 2
    assert cache.stats()["decodes"] == 5 and cache.stats()["hits"] == 1
    with pytest.raises(ValueError):  # shared arrays are read-only
        read_decoded(paths[0], cache)[0, 0] = 1


def test_rewritten_file_is_decoded_again(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    cache = DecodedImageCache(max_bytes=2**20)
    assert read_decoded(path, cache).max() == 0
    Image.fromarray(np.full((16, 20), 200, np.uint8)).save(path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    assert read_decoded(path, cache).max() == 200 and cache.decodes == 2


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_cached_form_resizes_exactly_like_a_fresh_decode(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "RGB":  # colour file: channels differ and must all be kept
        img = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 4096, (40, 56), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (40, 56), dtype=np.uint8))
    path = tmp_path / "img.png"
    img.save(path)
    fresh = images_mod.decode_image(path.read_bytes(), path)  # H x W x 3, the decoder's own output
    cached = read_decoded(path, DecodedImageCache(max_bytes=2**20))
    assert cached.ndim == (3 if mode == "RGB" else 2)
    for size in (16, 32, 64):
        np.testing.assert_array_equal(resize_rgb(cached, size), resize_rgb(fresh, size))
    np.testing.assert_array_equal(load_gray(path, 24, DecodedImageCache(max_bytes=2**20)),
                                  (resize_rgb(fresh, 24).mean(axis=2) / 255.0).astype(np.float32))
