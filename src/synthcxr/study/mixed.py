"""Linear mixed model with crossed random intercepts (readers and images), fitted by REML.

Realism ratings come from every reader on every image: both are random samples, so a model's mean
realism needs both variances in its standard error. statsmodels' MixedLM fits crossed effects only
through one big group and took minutes (without converging) on 20 readers x 100 images; here the
random-effects part is small (readers + images columns), so the REML likelihood is profiled over the
two variance ratios with q x q algebra (q = readers + images) and maximised with scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize


@dataclass
class MixedFit:
    beta: np.ndarray
    cov_beta: np.ndarray
    sigma2: float
    """Residual variance."""
    variances: dict[str, float]
    """Variance of each random-intercept factor."""
    converged: bool


def _one_blas_thread():  # noqa: ANN202 - a context manager
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(1)


def _indicators(codes: np.ndarray) -> np.ndarray:
    levels, index = np.unique(codes, return_inverse=True)
    z = np.zeros((len(codes), len(levels)))
    z[np.arange(len(codes)), index] = 1.0
    return z


def fit_crossed(y: np.ndarray, x: np.ndarray, factors: dict[str, np.ndarray]) -> MixedFit:
    """REML fit of y = X beta + sum_f Z_f u_f + e, u_f ~ N(0, s_f^2 I), e ~ N(0, s^2 I).

    With V = I + Z G Z' (G = diag of the variance ratios s_f^2 / s^2), M = G^-1 + Z'Z:
    log|V| = log|G| + log|M|, V^-1 = I - Z M^-1 Z', and the REML criterion is
    log|V| + log|X'V^-1 X| + (n - p) log(r'V^-1 r), r = y - X beta_hat (s^2 profiled out)."""
    y = np.asarray(y, float)
    x = np.asarray(x, float)
    n, p = x.shape
    names = list(factors)
    blocks = [_indicators(np.asarray(factors[f])) for f in names]
    z = np.hstack(blocks)
    sizes = [b.shape[1] for b in blocks]
    ztz, ztx, zty = z.T @ z, z.T @ x, z.T @ y
    xtx, xty = x.T @ x, x.T @ y

    def parts(log_ratios: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
        g = np.repeat(np.exp(log_ratios), sizes)
        m = ztz + np.diag(1.0 / g)
        chol = np.linalg.cholesky(m)
        solve = lambda b: np.linalg.solve(chol.T, np.linalg.solve(chol, b))  # noqa: E731
        mx, my = solve(ztx), solve(zty)
        xvx = xtx - ztx.T @ mx
        xvy = xty - ztx.T @ my
        beta = np.linalg.solve(xvx, xvy)
        rvr = float(y @ y - zty @ my - 2 * beta @ xvy + beta @ xvx @ beta)
        logdet_v = float(np.log(g).sum() + 2 * np.log(np.diag(chol)).sum())
        crit = logdet_v + float(np.linalg.slogdet(xvx)[1]) + (n - p) * math.log(max(rvr, 1e-300))
        return crit, beta, xvx, rvr

    def objective(v: np.ndarray) -> float:
        try:
            return parts(v)[0]
        except np.linalg.LinAlgError:
            return math.inf

    bounds = [(-20.0, 10.0)] * len(names)
    starts = [np.zeros(len(names)), np.full(len(names), -3.0)]
    with _one_blas_thread():  # q x q matrices: threads only add contention on a busy machine
        best = min((optimize.minimize(objective, s, method="L-BFGS-B", bounds=bounds,
                                      options={"ftol": 1e-13, "gtol": 1e-9}) for s in starts),
                   key=lambda r: r.fun)
    _, beta, xvx, rvr = parts(best.x)
    sigma2 = rvr / (n - p)
    ratios = np.exp(best.x)
    return MixedFit(beta, sigma2 * np.linalg.inv(xvx), sigma2,
                    {f: float(r * sigma2) if r > 1e-8 else 0.0 for f, r in zip(names, ratios, strict=True)},
                    bool(best.success))
