"""Planted near copies: the memorization check finds what a memorizing generator really makes.

Copies of training images are shifted (<= 8 px at the 64 px comparison size), rotated (<= 5 degrees),
mirrored, cropped (>= 85%), rescaled (>= 0.85, with a border), JPEG re-encoded or made brighter;
genuinely different real images (not in the training set, not in the calibration hold-outs) must
stay unflagged. Features come from a random-init network, so the image-space copy similarity has
to carry the detection. The measured rates are printed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from synthcxr.data.fixtures import synthetic_xray
from synthcxr.evaluate.features import ExtractorConfig, build_extractor, extract_features
from synthcxr.evaluate.memorization import CopySearch, copy_similarity, memorization_check

KINDS = ("shift", "rotation", "mirror", "crop", "centre_crop", "rescale", "jpeg", "brightness")


def plant(img: Image.Image, kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One near copy of `img` (mode L); shifts are drawn in pixels of the `size` comparison image."""
    w, h = img.size
    if kind == "shift":
        dx, dy = (rng.integers(4, 9, 2) * rng.choice([-1, 1], 2) * w / size).round()
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), Image.Resampling.BILINEAR)
    if kind == "rotation":
        return img.rotate(float(rng.choice([-1, 1]) * rng.uniform(2, 5)), Image.Resampling.BILINEAR)
    if kind == "mirror":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind in ("crop", "centre_crop"):
        f = rng.uniform(0.85, 0.92) if kind == "crop" else 0.85
        cw, ch = round(w * f), round(h * f)
        x0 = int(rng.integers(0, w - cw + 1)) if kind == "crop" else (w - cw) // 2
        y0 = int(rng.integers(0, h - ch + 1)) if kind == "crop" else (h - ch) // 2
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if kind == "rescale":  # smaller content on the same canvas, black border
        f = rng.uniform(0.85, 0.92)
        small = img.resize((round(w * f), round(h * f)), Image.Resampling.BILINEAR)
        out = Image.new("L", img.size, 0)
        out.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
        return out
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(20, 50)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("L")
    if kind == "brightness":
        out = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
        return ImageEnhance.Contrast(out).enhance(rng.uniform(0.8, 1.2))
    raise ValueError(kind)


def fixture_images(root: Path, n: int, seed: int, size: int = 256) -> list[Path]:
    """Fixture X-rays from the data layer's generator, each warped into its own "patient".

    The generator jitters its anatomy by about 1% of the image, so its images are near twins of one
    template. Patients differ more: each image gets a smooth random deformation (about 4% of the side)
    and a smooth intensity field, transformations outside what the copy search undoes.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    paths = []
    for i in range(n):
        img = synthetic_xray(size, i % 2 == 1, rng).astype(np.float64)
        fields = [gaussian_filter(rng.normal(0, 1, (size, size)), size / 8, mode="reflect") for _ in range(3)]
        dy, dx, gain = (f / np.abs(f).max() for f in fields)
        img = map_coordinates(img, [yy + 0.04 * size * dy, xx + 0.04 * size * dx], order=1, mode="nearest")
        img = np.clip(img * (1 + 0.15 * gain), 0, 1)
        path = root / f"fx_{seed}_{i:03d}.png"
        Image.fromarray((img * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def run_scenario(tmp: Path, train: list[Path], holdout: list[Path], negatives: list[Path], seed: int,
                 extractor, every: int = 1) -> tuple[dict[str, list[bool]], dict]:
    """Plant copies of each training image (every `every`-th kind, in turn); returns the flags per kind
    ("negative" for the genuinely different images) and the results of one memorization check."""
    rng = np.random.default_rng(seed)
    fake_dir = tmp / "fake"
    fake_dir.mkdir(parents=True, exist_ok=True)
    fakes, kinds = [], []
    for t, path in enumerate(train):
        img = Image.open(path).convert("L")
        for kind in KINDS[(t + seed) % every::every]:
            out = fake_dir / f"copy_{t:03d}_{kind}.png"
            plant(img, kind, rng).save(out, compress_level=1)
            fakes.append(out)
            kinds.append(kind)
    fakes += negatives
    kinds += ["negative"] * len(negatives)
    feats = {name: extract_features(paths, extractor).features if paths else None
             for name, paths in (("fake", fakes), ("train", train), ("holdout", holdout))}
    res = memorization_check(feats["fake"], feats["train"], fakes, train, holdout_feats=feats["holdout"],
                             holdout_paths=holdout, top_pairs=0, flag_by_features=False)
    flagged = {p["synthetic"] for p in res["flagged"]}
    per_kind: dict[str, list[bool]] = {}
    for path, kind in zip(fakes, kinds, strict=True):
        per_kind.setdefault(kind, []).append(str(path) in flagged)
    return per_kind, res


def _report(capsys, title: str, per_kind: dict[str, list[bool]]) -> tuple[float, float]:
    copies = [f for k, fs in per_kind.items() if k != "negative" for f in fs]
    det, fpr = float(np.mean(copies)), float(np.mean(per_kind["negative"]))
    with capsys.disabled():
        print(f"\n[memorization] {title}: planted near copies flagged {sum(copies)}/{len(copies)} = {det:.1%}; "
              f"genuinely different images flagged {sum(per_kind['negative'])}/{len(per_kind['negative'])} = {fpr:.1%}")
        print("  per kind: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in per_kind.items() if k != "negative"))
    return det, fpr


def _merge(total: dict[str, list[bool]], part: dict[str, list[bool]]) -> None:
    for k, v in part.items():
        total.setdefault(k, []).extend(v)


@pytest.fixture(scope="module")
def random_extractor():
    return build_extractor(ExtractorConfig(name="random", device="cpu"))


@pytest.mark.slow
def test_planted_copies_in_fixture_xrays_are_flagged(tmp_path, capsys, random_extractor):
    paths = fixture_images(tmp_path / "fixtures", 36, seed=7)
    train, holdout, negatives = paths[:12], paths[12:24], paths[24:]
    per_kind, res = run_scenario(tmp_path / "run", train, holdout, negatives, seed=0, extractor=random_extractor)
    assert res["calibration"]["null"] == "hold-out" and res["calibration"]["n_null"] == 12
    det, fpr = _report(capsys, "fixture X-rays (12 train, 12 hold-outs, 12 different)", per_kind)
    assert det >= 0.90 and fpr <= 0.05


@pytest.mark.slow
def test_planted_copies_in_real_shenzhen_images_are_flagged(tmp_path, capsys, shared_shenzhen, random_extractor):
    """Four folds over the 16 real images: 12 train (leave-one-out null), 4 different images each."""
    paths = sorted((shared_shenzhen / "ChinaSet_AllFiles" / "CXR_png").glob("*.png"))
    assert len(paths) >= 16
    order = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]
    total: dict[str, list[bool]] = {}
    for fold in range(4):
        rolled = order[4 * fold:] + order[:4 * fold]
        per_kind, res = run_scenario(tmp_path / f"fold{fold}", rolled[:12], [], rolled[12:16], seed=fold,
                                     extractor=random_extractor, every=2)
        assert res["calibration"]["null"] == "leave-one-out"
        _merge(total, per_kind)
    det, fpr = _report(capsys, "real Shenzhen images (4 folds: 12 train, leave-one-out null, 4 different)", total)
    assert det >= 0.90 and fpr <= 0.05


def test_copy_similarity_undoes_mirror_shift_and_rotation_exactly():
    """A mirrored, shifted copy is found at the right alignment with similarity ~1; noise is not."""
    rng = np.random.default_rng(0)
    base = synthetic_xray(64, True, rng)
    shifted = np.roll(base[:, ::-1], (3, -5), axis=(0, 1))
    refs = np.stack([base, rng.random((64, 64)).astype(np.float32)])
    sims, warp, shift = copy_similarity(shifted[None], refs, np.array([[0, 1]]), CopySearch())
    meta = CopySearch().warps()[1][warp[0, 0]]
    assert sims[0, 0] > 0.99 and sims[0, 1] < 0.3
    assert meta["mirror"] and meta["rotation_deg"] == 0 and meta["scale"] == 1.0
    assert list(shift[0, 0]) in ([-3, -5], [-3, 5], [3, 5], [3, -5])
