"""FID/KID/PRDC: known answers and agreement with reference implementations on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from synthcxr.errors import EvaluationError
from synthcxr.evaluate.fidelity import (
    KernelMatrices,
    fid,
    fidelity_metrics,
    frechet_distance,
    kid,
    mmd2_unbiased,
    polynomial_kernel,
    prdc,
)


def _feats(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) * scale + shift


@pytest.mark.parametrize("method", ["svd", "sqrtm"])
def test_identical_sets_have_zero_fid(method):
    x = _feats(200, 16, 0)
    assert abs(fid(x, x.copy(), method)) < 1e-6


@pytest.mark.parametrize("method", ["svd", "sqrtm"])
def test_shifted_scaled_gaussians_match_analytic_fid(method):
    # N(0, I) vs N(m, s^2 I): FID = |m|^2 + d (1 - s)^2; large samples make the estimate close
    d, shift, scale = 8, 0.5, 1.5
    a = _feats(20000, d, 1)
    b = _feats(20000, d, 2, shift=shift, scale=scale)
    expected = d * shift**2 + d * (1 - scale) ** 2
    assert fid(a, b, method) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize(("n_a", "n_b", "d"), [(300, 280, 32), (40, 50, 128)])
def test_fid_matches_scipy_sqrtm_reference(n_a, n_b, d):
    a = _feats(n_a, d, 3)
    b = _feats(n_b, d, 4, shift=0.2, scale=1.1)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert fid(a, b, "svd") == pytest.approx(reference, rel=1e-4)
    assert fid(a, b, "sqrtm") == pytest.approx(reference, rel=1e-4)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-4)


def test_fid_matches_torchmetrics_on_the_same_features():
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):  # the "images" are already features
        num_features = 64

        def forward(self, x):
            return x

    a = _feats(150, 64, 5)
    b = _feats(120, 64, 6, shift=0.3, scale=0.8)
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    reference = float(metric.compute())
    assert fid(a, b, "svd") == pytest.approx(reference, rel=1e-4)
    assert fid(a, b, "sqrtm") == pytest.approx(reference, rel=1e-4)


def test_kid_matches_its_formula_and_torchmetrics():
    import torch
    from torchmetrics.image.kid import poly_mmd

    x = _feats(30, 10, 7)
    y = _feats(25, 10, 8, shift=0.4)
    # formula of Binkowski et al.: unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3
    m, n, d = len(x), len(y), x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    formula = xx + yy - 2 * xy
    ours = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    assert ours == pytest.approx(formula, rel=1e-4)
    # equal sizes: the torchmetrics subset computation
    tm = float(poly_mmd(torch.from_numpy(x[:25]), torch.from_numpy(y)))
    assert KernelMatrices(x[:25], y).mmd2(np.arange(25), np.arange(25)) == pytest.approx(tm, rel=1e-4)


def test_kid_subsets_mean_std_and_cap():
    x = _feats(40, 8, 9)
    y = _feats(30, 8, 10, shift=1.0)
    res = kid(x, y, subsets=20, subset_size=1000, seed=0)
    assert res["subset_size"] == 30 and res["subset_size_capped"]
    assert res["mean"] > 0 and res["std"] >= 0
    # same distribution: unbiased, so near zero next to a shifted set of the same size
    a, b = _feats(300, 8, 15), _feats(300, 8, 16)
    same = kid(a, b, subsets=50, subset_size=150, seed=0)
    shifted = kid(a, b + 1.0, subsets=50, subset_size=150, seed=0)
    assert abs(same["mean"]) < shifted["mean"] / 20


def test_prdc_matches_reference_package():
    from prdc import compute_prdc

    real = _feats(120, 12, 11)
    fake = _feats(90, 12, 12, shift=0.4, scale=1.2)
    ours = prdc(real, fake, k=5)
    ref = compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-9), key


def test_fidelity_metrics_have_cis_around_values_and_warnings():
    real = _feats(60, 8, 13)
    fake = _feats(50, 8, 14, shift=0.5)
    res, warnings = fidelity_metrics(real, fake, kid_subsets=10, kid_subset_size=40, ci_groups=15)
    for key in ("fid", "precision", "recall", "density", "coverage"):
        lo, hi = res[key]["ci"]
        assert lo <= res[key]["value"] <= hi
    assert res["kid"]["ci"][0] <= res["kid"]["mean"] <= res["kid"]["ci"][1]
    assert any("2000" in w and "KID" in w for w in warnings)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(EvaluationError, match="at least 6 synthetic images"):
        fidelity_metrics(_feats(20, 4, 0), _feats(3, 4, 1))
    with pytest.raises(EvaluationError, match="FID needs at least 2 real"):
        fid(_feats(1, 4, 0), _feats(5, 4, 1))
