"""MS-SSIM diversity and the memorization (near-copy) check."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from synthcxr.errors import EvaluationError
from synthcxr.evaluate.diversity import msssim_setting, random_pairs, within_set_msssim
from synthcxr.evaluate.features import ExtractorConfig, build_extractor, extract_features
from synthcxr.evaluate.images import load_gray_stack
from synthcxr.evaluate.memorization import FALLBACK_THRESHOLDS, calibrate, memorization_check

from .conftest import make_images


def test_msssim_setting_is_standard_at_256_and_shrinks_for_small_images():
    assert msssim_setting(256) == {"scales": 5, "kernel_size": 11, "sigma": 1.5,
                                   "betas": pytest.approx([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], rel=1e-3)}
    small = msssim_setting(64)
    assert small["kernel_size"] == 11 and small["scales"] == 3
    assert sum(small["betas"]) == pytest.approx(1.0)
    assert 64 // 2 ** (small["scales"] - 1) >= small["kernel_size"]
    with pytest.raises(EvaluationError):
        msssim_setting(2)


def test_random_pairs_are_distinct_seeded_and_capped():
    pairs = random_pairs(50, 100, seed=3)
    assert len(pairs) == 100 and (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs}) == 100
    np.testing.assert_array_equal(pairs, random_pairs(50, 100, seed=3))
    assert len(random_pairs(5, 100, seed=0)) == 10  # all pairs when there are fewer


def test_mode_collapse_shows_as_higher_msssim(tmp_path):
    varied = load_gray_stack(sorted(make_images(tmp_path / "real", 10, seed=1).glob("*.png")), 64)
    collapsed = np.stack([varied[0] + np.random.default_rng(i).normal(0, 0.01, varied[0].shape).astype(np.float32)
                          for i in range(10)]).clip(0, 1)
    real = within_set_msssim(varied, n_pairs=20, seed=0, n_boot=50)
    fake = within_set_msssim(collapsed, n_pairs=20, seed=0, n_boot=50)
    assert fake["mean"] > real["ci"][1]
    assert fake["mean"] > 0.9 and real["scales"] == 3 and real["n_pairs"] == 20
    with pytest.raises(EvaluationError, match="at least 2"):
        within_set_msssim(varied[:1])


def test_memorization_finds_a_planted_copy(tmp_path):
    train = make_images(tmp_path / "train", 12, seed=1)
    fake = make_images(tmp_path / "fake", 8, seed=2, shift=5)
    planted = sorted(train.glob("*.png"))[5]
    # a re-encoded copy with slight noise, as a memorizing generator would produce
    arr = np.asarray(Image.open(planted), dtype=np.float32) + np.random.default_rng(0).normal(0, 2, (64, 64))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(fake / "zz_copy.png")
    shutil.copy(planted, fake / "zz_exact.png")

    ext = build_extractor(ExtractorConfig(name="random", device="cpu"))
    fake_paths, train_paths = sorted(fake.glob("*.png")), sorted(train.glob("*.png"))
    res = memorization_check(extract_features(fake_paths, ext).features, extract_features(train_paths, ext).features,
                             fake_paths, train_paths, candidates=5, top_pairs=3, pairs_dir=tmp_path / "pairs")
    top_names = {p["synthetic"].rsplit("/", 1)[-1] for p in res["top_pairs"][:2]}
    assert top_names == {"zz_copy.png", "zz_exact.png"}
    for pair in res["top_pairs"][:2]:
        assert pair["nearest_by_copy"] == str(planted) and pair["nearest_by_feature"] == str(planted)
        assert pair["flagged"] and pair["copy_similarity"] > 0.95
        assert pair["alignment"] == {"mirror": False, "rotation_deg": 0.0, "scale": 1.0, "shift_px": [0, 0]}
    assert res["top_pairs"][0]["copy_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert {p["synthetic"] for p in res["flagged"]} == {str(fake / "zz_copy.png"), str(fake / "zz_exact.png")}
    saved = sorted((tmp_path / "pairs").glob("pair_*.png"))
    assert len(saved) == 3 and Image.open(saved[0]).size == (256 * 2 + 8, 256)
    assert res["copy_similarity"]["max"] == pytest.approx(1.0, abs=1e-4)
    assert len(res["copy_similarity"]["histogram"]["counts"]) == 10
    # 12 training images and no hold-outs: calibrated leave-one-out, and the result says so
    cal, copy = res["calibration"], res["thresholds"]["copy_similarity"]
    assert cal["null"] == "leave-one-out" and cal["n_null"] == 12 and "no real hold-out" in cal["note"]
    assert copy["null_n"] == 12 and copy["null_above"] == 0 and "quantile" in copy["source"]
    assert f"<= {copy['threshold']:.4f}" in res["not_flagged_means"] and "horizontal mirror" in res["not_flagged_means"]
    # a capped null is a random subset, and never an image matched with itself
    capped = memorization_check(extract_features(fake_paths, ext).features, extract_features(train_paths, ext).features,
                                fake_paths, train_paths, candidates=5, top_pairs=0, null_images=10)
    assert capped["calibration"]["n_null"] == 10 and "a random 10 of them" in capped["calibration"]["note"]
    assert capped["thresholds"]["copy_similarity"]["null"]["max"] < 0.99


def test_memorization_thresholds_fall_back_without_a_null(tmp_path):
    """Three training images and no hold-outs cannot calibrate anything: the fixed fallbacks are used and named."""
    train = sorted(make_images(tmp_path / "train", 3, seed=1).glob("*.png"))
    fake = sorted(make_images(tmp_path / "fake", 2, seed=2).glob("*.png"))
    ext = build_extractor(ExtractorConfig(name="random", device="cpu"))
    res = memorization_check(extract_features(fake, ext).features, extract_features(train, ext).features, fake, train,
                             top_pairs=0)
    assert res["calibration"]["null"] == "none" and "too few" in res["calibration"]["note"]
    assert res["thresholds"]["copy_similarity"]["threshold"] == FALLBACK_THRESHOLDS["copy_similarity"]
    assert "fallback" in res["thresholds"]["copy_similarity"]["source"] and "fallback" in res["not_flagged_means"]


def test_calibrated_threshold_is_a_high_quantile_of_the_null():
    rng = np.random.default_rng(0)
    null = np.tanh(rng.normal(1.5, 0.1, 2000))
    big = calibrate(null, 0.99, None, 0.5)
    assert big["threshold"] == pytest.approx(np.quantile(null, 0.99)) and big["source"].startswith("empirical")
    assert big["null_above"] == sum(null > big["threshold"]) and 10 <= big["null_above"] <= 30
    small = calibrate(null[:12], 0.99, None, 0.5)  # too few for an empirical 0.99 quantile: a fitted tail
    assert small["threshold"] > null[:12].max() and "Fisher" in small["source"] and small["null_above"] == 0
    assert calibrate(null[:12], 1.0, None, 0.5)["threshold"] == null[:12].max()
    assert calibrate(null, 0.99, 0.9, 0.5) == {**calibrate(null, 0.99, 0.9, 0.5), "threshold": 0.9,
                                               "source": "fixed by the user"}


def test_evaluate_calibrates_on_real_images_that_are_not_training_images(tmp_path):
    """--real holds 4 training images and 12 others: the 12 are the null; a mirrored, shifted copy is flagged."""
    from synthcxr.evaluate.run import EvaluateConfig, evaluate

    train = make_images(tmp_path / "train", 12, seed=1)
    real = make_images(tmp_path / "real", 12, seed=3)
    for path in sorted(train.glob("*.png"))[:4]:
        shutil.copy(path, real / f"also_{path.name}")
    fake = make_images(tmp_path / "fake", 6, seed=2)
    source = sorted(train.glob("*.png"))[7]
    Image.fromarray(np.roll(np.asarray(Image.open(source))[:, ::-1], (4, -3), axis=(0, 1))).save(fake / "copy.png")
    res = evaluate(EvaluateConfig(real=real, train=train, fake=fake, out=tmp_path / "eval.json", metrics=["memorization"],
                                  extractor={"name": "random", "device": "cpu"}, memorization={"top_pairs": 1}))
    mem = res["memorization"]
    assert mem["calibration"]["null"] == "hold-out" and mem["calibration"]["n_null"] == 12
    assert "12 from --real" in mem["calibration"]["note"] and mem["flag_by_features"] is False
    assert [p["synthetic"] for p in mem["flagged"]] == [str(fake / "copy.png")]
    assert mem["flagged"][0]["nearest_by_copy"] == str(source) and mem["flagged"][0]["alignment"]["mirror"]
    assert not any("memorization thresholds" in w for w in res["warnings"])  # calibrated on hold-outs: nothing to warn


def test_old_memorization_keys_are_read_under_their_new_names():
    from synthcxr.evaluate.run import MemorizationConfig

    cfg = MemorizationConfig.model_validate({"ssim_size": 32, "ssim_candidates": 4, "ssim_threshold": 0.9})
    assert cfg.image_size == 32 and cfg.candidates == 4 and cfg.copy_threshold is None
    with pytest.raises(ValueError, match="max_shift"):
        MemorizationConfig(image_size=16, max_shift=8)
