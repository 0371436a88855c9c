"""One alpha rule for training and evaluation: a transparent pixel reads as black (composited over black).

Before, the data layer composited over black while evaluation dropped the alpha channel, so the
images a model was trained on and the ones it was scored against differed wherever alpha < 255.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from synthcxr.data.preprocess import flatten_alpha, load_image
from synthcxr.evaluate.images import read_decoded, resize_rgb


def _gray_with_alpha(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (size, size), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, size).round().astype(np.uint8), (size, 1))  # 0 (left) .. 255 (right)
    return gray, alpha


def _files(tmp_path) -> dict[str, object]:
    gray, alpha = _gray_with_alpha()
    rgba = np.dstack([gray, gray, gray, alpha])
    palette = Image.fromarray(gray, "L").convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # one palette entry fully transparent
    images = {"rgba": Image.fromarray(rgba, "RGBA"), "la": Image.fromarray(np.dstack([gray, alpha]), "LA"),
              "p-transparency": palette}
    paths = {}
    for name, img in images.items():
        paths[name] = tmp_path / f"{name}.png"
        img.save(paths[name], transparency=img.info["transparency"]) if name == "p-transparency" else img.save(paths[name])
    return paths


@pytest.mark.parametrize("name", ["rgba", "la", "p-transparency"])
def test_training_and_evaluation_read_identical_pixels(tmp_path, name):
    path = _files(tmp_path)[name]
    trained_on = np.asarray(load_image(path, resolution=32), dtype=np.float32)  # the data/training path
    evaluated = resize_rgb(read_decoded(path), 32)  # the evaluation path (features, SSIM, classifier)
    assert np.array_equal(trained_on, evaluated)
    with Image.open(path) as img:
        assert np.array_equal(np.asarray(flatten_alpha(img).convert("RGB")), trained_on.astype(np.uint8))


def test_the_rule_is_value_times_alpha():
    gray, alpha = _gray_with_alpha()
    flat = np.asarray(flatten_alpha(Image.fromarray(np.dstack([gray, gray, gray, alpha]), "RGBA")).convert("L"), int)
    expected = gray.astype(float) * alpha / 255.0
    assert np.abs(flat - expected).max() <= 1  # integer rounding only
    assert (flat[:, 0] == 0).all() and (flat[:, -1] == gray[:, -1]).all()


def test_images_without_alpha_are_untouched():
    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    assert flatten_alpha(img) is img
    rgb = img.convert("RGB")
    assert flatten_alpha(rgb) is rgb


def test_decoded_rgba_pixels_of_a_record_follow_the_same_rule(tmp_path):
    from synthcxr.data.preprocess import gray_from_pixels, read_gray

    path = _files(tmp_path)["rgba"]
    with Image.open(path) as img:
        pixels = np.asarray(img)
    assert np.array_equal(np.asarray(gray_from_pixels(pixels)), np.asarray(read_gray(path)))


def test_features_of_a_transparent_image_are_those_of_its_flattened_pixels(tmp_path):
    # the feature cache key names the decoding, so features cached under the old rule are not reused
    from synthcxr.evaluate.features import DECODE_VERSION, ExtractorConfig, build_extractor, extract_features

    path = _files(tmp_path)["rgba"]
    flat = tmp_path / "flat.png"
    with Image.open(path) as img:
        flatten_alpha(img).save(flat)
    ext = build_extractor(ExtractorConfig(name="random", device="cpu", image_size=32))
    feats = extract_features([path, flat], ext, None).features
    assert np.array_equal(feats[0], feats[1])
    assert ext.id.endswith(DECODE_VERSION)


def test_evaluation_sees_a_rotated_jpeg_upright_as_training_does(tmp_path):
    """A JPEG with an EXIF orientation tag is trained on upright (data.preprocess applies the tag);
    evaluation (FID features, memorization) must compare that same upright picture, not the raw one."""
    from synthcxr.data.preprocess import read_gray
    from synthcxr.evaluate.images import decode_image

    upright = np.zeros((24, 40), dtype=np.uint8)
    upright[:, :10] = 255  # a bright band on the left
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored rotated ...
    exif = Image.Exif()
    exif[0x0112] = 8  # ... with "rotate 90 CW to display" (orientation 8 undoes ROTATE_90)
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=100)
    trained = np.asarray(read_gray(path))
    evaluated = decode_image(path.read_bytes(), path)
    assert trained.shape == evaluated.shape[:2] == (24, 40)
    assert np.abs(evaluated[..., 0].astype(int) - trained.astype(int)).max() <= 1
