"""The report says what a memorization flag, and its absence, means: threshold, calibration, transformations."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from synthcxr.data.fixtures import synthetic_xray
from synthcxr.evaluate.features import ExtractorConfig, build_extractor, extract_features
from synthcxr.evaluate.memorization import memorization_check
from synthcxr.report.build import build_report


def _xrays(root, n, seed):
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):  # each with its own smooth "anatomy" on top of the fixture X-ray
        yy, xx = np.mgrid[:64, :64] / 64
        img = synthetic_xray(64, i % 2 == 1, rng) + 0.15 * np.sin(xx * rng.uniform(3, 9) + yy * rng.uniform(3, 9))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / f"x{seed}_{i:02d}.png")
    return sorted(root.glob("*.png"))


def test_report_shows_calibration_coverage_and_alignment(fake_grid, tmp_path):
    train = _xrays(tmp_path / "train", 12, seed=1)
    fake_dir = _xrays(tmp_path / "fake", 3, seed=2)[0].parent
    Image.fromarray(np.asarray(Image.open(train[4]))[:, ::-1]).save(fake_dir / "mirrored_copy.png")
    fake = sorted(fake_dir.glob("*.png"))
    ext = build_extractor(ExtractorConfig(name="random", device="cpu"))
    mem = memorization_check(extract_features(fake, ext).features, extract_features(train, ext).features, fake, train,
                             top_pairs=2, pairs_dir=tmp_path / "pairs", flag_by_features=False)
    assert mem["top_pairs"][0]["synthetic"].endswith("mirrored_copy.png") and mem["top_pairs"][0]["flagged"]

    run = tmp_path / "grid" / "runs" / "lora-prodigy"
    shutil.copytree(fake_grid / "runs" / "lora-prodigy", run)
    data = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps({**data, "memorization": mem}))
    html = build_report(run, tmp_path / "one.html").read_text()
    threshold = f"{mem['thresholds']['copy_similarity']['threshold']:.4f}"
    assert "Not flagged means: copy similarity to the nearest training image &lt;= " + threshold in html
    assert "leave-one-out" in html and "horizontal mirror" in html and "Not covered" in html
    assert "copy similarity 1 &middot;" in html and "mirrored &middot;" in html and "flagged" in html
    assert "<b>copy_max</b>" in html
