"""Crossed random-intercept mixed model (REML) for realism ratings."""

from __future__ import annotations

import numpy as np
import pytest

from synthcxr.study.mixed import fit_crossed


def _crossed(seed: int, readers: int = 8, images: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rr, ii = (a.ravel() for a in np.meshgrid(np.arange(readers), np.arange(images), indexing="ij"))
    y = 3 + rng.normal(0, 0.6, readers)[rr] + rng.normal(0, 0.9, images)[ii] + rng.normal(0, 1, rr.size)
    return y, rr, ii


def test_balanced_design_equals_the_anova_estimates():
    """Balanced and all components positive: REML = the ANOVA (expected mean squares) estimates,
    and the mean's variance is (MS_R + MS_I - MS_E) / (R I)."""
    y, rr, ii = _crossed(0)
    fit = fit_crossed(y, np.ones((y.size, 1)), {"reader": rr, "image": ii})
    table = y.reshape(8, 30)
    grand = table.mean()
    ms_r = 30 * ((table.mean(1) - grand) ** 2).sum() / 7
    ms_i = 8 * ((table.mean(0) - grand) ** 2).sum() / 29
    resid = table - table.mean(1, keepdims=True) - table.mean(0, keepdims=True) + grand
    ms_e = (resid ** 2).sum() / (7 * 29)
    assert fit.converged
    assert fit.beta[0] == pytest.approx(grand)
    assert fit.sigma2 == pytest.approx(ms_e, rel=1e-4)
    assert fit.variances["reader"] == pytest.approx((ms_r - ms_e) / 30, rel=1e-3)
    assert fit.variances["image"] == pytest.approx((ms_i - ms_e) / 8, rel=1e-3)
    assert fit.cov_beta[0, 0] == pytest.approx((ms_r + ms_i - ms_e) / 240, rel=1e-3)


def test_unbalanced_design_matches_the_dense_reml_formula():
    """20% of ratings missing, two fixed image groups: the fit maximises the textbook REML
    likelihood written with the full n x n covariance (no Woodbury algebra), and its GLS estimate."""
    from scipy import optimize

    y, rr, ii = _crossed(3, readers=5, images=16)
    keep = np.random.default_rng(2).random(y.size) > 0.2
    group = (ii % 2).astype(float)
    y, rr, ii, group = y[keep] + 0.5 * group[keep], rr[keep], ii[keep], group[keep]
    x = np.column_stack([np.ones(y.size), group])
    zr = (rr[:, None] == np.arange(5)[None, :]).astype(float)
    zi = (ii[:, None] == np.arange(16)[None, :]).astype(float)
    n, p = x.shape

    def dense(v: np.ndarray) -> tuple[float, np.ndarray, float]:
        s2r, s2i, s2e = np.exp(v)
        cov = s2r * zr @ zr.T + s2i * zi @ zi.T + s2e * np.eye(n)
        inv = np.linalg.inv(cov)
        xvx = x.T @ inv @ x
        beta = np.linalg.solve(xvx, x.T @ inv @ y)
        r = y - x @ beta
        crit = np.linalg.slogdet(cov)[1] + np.linalg.slogdet(xvx)[1] + r @ inv @ r
        return float(crit), beta, xvx

    best = optimize.minimize(lambda v: dense(v)[0], np.zeros(3), method="Nelder-Mead",
                             options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
    _, beta, xvx = dense(best.x)
    fit = fit_crossed(y, x, {"r": rr, "i": ii})
    s2r, s2i, s2e = np.exp(best.x)
    assert min(s2r, s2i) > 0.05  # an interior optimum (no variance on its boundary at 0)
    assert fit.beta == pytest.approx(beta, abs=1e-4)
    assert fit.cov_beta == pytest.approx(np.linalg.inv(xvx), rel=1e-3)
    assert [fit.variances["r"], fit.variances["i"], fit.sigma2] == pytest.approx([s2r, s2i, s2e], rel=1e-3)
