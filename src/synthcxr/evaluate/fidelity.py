"""Fidelity metrics on feature arrays: FID, KID, precision/recall/density/coverage, bootstrap CIs.

All functions take `real` (N x D) and `fake` (M x D) features and know nothing about images.

FID  = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2)  (Heusel et al. 2017).
       `method="sqrtm"`: scipy.linalg.sqrtm of S_r S_f (the reference, as pytorch-fid/clean-fid).
       `method="svd"`: the same trace computed exactly as the nuclear norm of A B^T / sqrt((N-1)(M-1))
       with A, B the centred feature matrices (the eigenvalues of S_r S_f are the squared singular
       values of that matrix). It never forms a D x D square root, is numerically stable for the
       rank-deficient covariances of small sets, and is what the bootstrap uses (fast).
KID  = unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al.
       2018), averaged over random subsets, as torchmetrics/clean-fid do.
PRDC = Naeem et al. 2020 with k nearest neighbours in Euclidean feature space (k=5 by default, as
       CheXGenBench), identical to the `prdc` reference package.
CIs  = percentile bootstrap (both sets resampled with replacement). FID replicates are biased upward
       (duplicates shrink the effective set), so the FID interval shows the spread and may sit above
       the point estimate; KID replicates use the same unbiased formula on the resampled positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg

from synthcxr.errors import EvaluationError

FID_RELIABLE_N = 2000


def _check(real: np.ndarray, fake: np.ndarray, need: int, metric: str) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise EvaluationError(f"{metric}: features must be N x D and M x D with equal D (got {real.shape}, {fake.shape})")
    for role, arr in (("real", real), ("synthetic", fake)):
        if len(arr) < need:
            raise EvaluationError(
                f"{metric} needs at least {need} {role} images, got {len(arr)}",
                fix=f"add {role} images (hundreds to thousands for stable numbers), or leave {metric} out",
            )


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """FID from Gaussian statistics with scipy's matrix square root (the reference method)."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """Tr((S_a S_b)^1/2) from centred features, exactly, via singular values."""
    na, nb, d = len(a), len(b), a.shape[1]
    if min(na, nb) <= d:
        s = np.linalg.svd(a @ b.T, compute_uv=False)
        return float(s.sum() / np.sqrt((na - 1) * (nb - 1)))
    sa = a.T @ a / (na - 1)
    sb = b.T @ b / (nb - 1)
    # (R_a R_b)(R_a R_b)^T = R_a S_b R_a has the eigenvalues of S_a S_b
    return float(np.linalg.svd(_psd_sqrt(sa) @ _psd_sqrt(sb), compute_uv=False).sum())


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid(real: np.ndarray, fake: np.ndarray, method: str = "sqrtm") -> float:
    """FID between two feature sets (`sqrtm`: scipy reference; `svd`: exact and fast, see module doc)."""
    _check(real, fake, 2, "FID")
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    if method == "sqrtm":
        return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    if method != "svd":
        raise EvaluationError(f"unknown FID method {method!r}", fix="use sqrtm or svd")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    a, b = real - mu_r, fake - mu_f
    tr_r = float((a * a).sum() / (len(a) - 1))
    tr_f = float((b * b).sum() / (len(b) - 1))
    diff = mu_r - mu_f
    return float(diff @ diff + tr_r + tr_f - 2.0 * _trace_sqrt_product(a, b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> np.ndarray:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 (diagonals of k_xx, k_yy excluded), as in the KID paper and torchmetrics."""
    m, n = len(k_xx), len(k_yy)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


class KernelMatrices:
    """Kernel matrices of the full sets, computed once; subsets and bootstrap draws only index them."""

    def __init__(self, real: np.ndarray, fake: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0):
        real = np.asarray(real, np.float64)
        fake = np.asarray(fake, np.float64)
        self.k_rr = polynomial_kernel(real, real, degree, gamma, coef)
        self.k_ff = polynomial_kernel(fake, fake, degree, gamma, coef)
        self.k_rf = polynomial_kernel(real, fake, degree, gamma, coef)

    def mmd2(self, idx_r: np.ndarray, idx_f: np.ndarray) -> float:
        return mmd2_unbiased(self.k_rr[np.ix_(idx_r, idx_r)], self.k_ff[np.ix_(idx_f, idx_f)], self.k_rf[np.ix_(idx_r, idx_f)])


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        degree: int = 3, gamma: float | None = None, coef: float = 1.0,
        kernels: KernelMatrices | None = None) -> dict[str, Any]:
    """KID: mean and std of the unbiased MMD^2 over `subsets` random subsets drawn without replacement.

    The subset size is capped at the smaller set (noted in the result) instead of failing.
    """
    _check(real, fake, 2, "KID")
    size = min(subset_size, len(real), len(fake))
    kernels = kernels or KernelMatrices(real, fake, degree, gamma, coef)
    rng = np.random.default_rng(seed)
    values = np.array([
        kernels.mmd2(rng.choice(len(real), size, replace=False), rng.choice(len(fake), size, replace=False))
        for _ in range(subsets)
    ])
    return {"mean": float(values.mean()), "std": float(values.std()), "subsets": subsets, "subset_size": size,
            "subset_size_capped": size < subset_size}


def _kth_neighbour_distance(dist: np.ndarray, k: int) -> np.ndarray:
    """Distance to the k-th nearest other point (column 0 of a sorted row is the point itself)."""
    return np.partition(dist, k, axis=1)[:, k]


def _pairwise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(sq, 0, None))


class PRDCParts:
    """Per-sample indicators whose means are precision/recall/density/coverage (Naeem et al. 2020).

    Bootstrap CIs resample these per-sample terms while the k-NN manifolds stay those of the full sets
    (resampling the manifold itself would create duplicate points at distance 0 and shrink the radii).
    """

    def __init__(self, real: np.ndarray, fake: np.ndarray, k: int = 5):
        _check(real, fake, k + 1, f"precision/recall/density/coverage (k={k})")
        real_radii = _kth_neighbour_distance(_pairwise(real, real), k)
        fake_radii = _kth_neighbour_distance(_pairwise(fake, fake), k)
        d_rf = _pairwise(real, fake)
        inside_real = d_rf < real_radii[:, None]  # fake j inside real i's ball
        self.k = k
        self.precision = inside_real.any(axis=0).astype(np.float64)  # per fake
        self.density = inside_real.sum(axis=0) / k  # per fake
        self.recall = (d_rf < fake_radii[None, :]).any(axis=1).astype(np.float64)  # per real
        self.coverage = (d_rf.min(axis=1) < real_radii).astype(np.float64)  # per real

    def values(self, idx_r: np.ndarray | None = None, idx_f: np.ndarray | None = None) -> dict[str, float]:
        sel_f = slice(None) if idx_f is None else idx_f
        sel_r = slice(None) if idx_r is None else idx_r
        return {
            "precision": float(self.precision[sel_f].mean()),
            "recall": float(self.recall[sel_r].mean()),
            "density": float(self.density[sel_f].mean()),
            "coverage": float(self.coverage[sel_r].mean()),
        }


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    return PRDCParts(real, fake, k).values()


def bootstrap(stat: Callable[[np.ndarray, np.ndarray], dict[str, float] | float], n_real: int, n_fake: int,
              n_boot: int, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap: resample both sets with replacement `n_boot` times, return (low, high) per statistic."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        out = stat(rng.integers(0, n_real, n_real), rng.integers(0, n_fake, n_fake))
        for key, val in (out.items() if isinstance(out, dict) else [("value", out)]):
            draws.setdefault(key, []).append(val)
    alpha = (1.0 - level) / 2.0
    return {key: (float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))) for key, v in draws.items()}


def fidelity_metrics(real: np.ndarray, fake: np.ndarray, *, fid_method: str = "svd", kid_subsets: int = 100,
                     kid_subset_size: int = 1000, k: int = 5, n_boot: int = 100, level: float = 0.95,
                     seed: int = 0) -> tuple[dict[str, Any], list[str]]:
    """FID, KID and PRDC with bootstrap CIs, plus warnings a reader of the numbers must see."""
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    _check(real, fake, max(2, k + 1), "fidelity metrics")
    warnings: list[str] = []
    n_r, n_f, d = len(real), len(fake), real.shape[1]
    if min(n_r, n_f) < FID_RELIABLE_N:
        warnings.append(
            f"FID is biased upward below ~{FID_RELIABLE_N} images per set (have {n_r} real, {n_f} synthetic): "
            "compare FIDs only at equal set sizes, and prefer KID, which is unbiased, for small sets"
        )
    if min(n_r, n_f) <= d:
        warnings.append(f"fewer images than feature dimensions ({min(n_r, n_f)} <= {d}): covariances are rank-deficient")

    value = fid(real, fake, fid_method)
    fid_ci = bootstrap(lambda ir, jf: fid(real[ir], fake[jf], "svd"), n_r, n_f, n_boot, seed, level).get("value")

    kernels = KernelMatrices(real, fake)
    kid_res = kid(real, fake, kid_subsets, kid_subset_size, seed, kernels=kernels)
    if kid_res["subset_size_capped"]:
        warnings.append(f"KID subset size capped at {kid_res['subset_size']} (the smaller set)")
    kid_ci = bootstrap(kernels.mmd2, n_r, n_f, n_boot, seed + 1, level).get("value")

    parts = PRDCParts(real, fake, k)
    prdc_vals = parts.values()
    prdc_ci = bootstrap(parts.values, n_r, n_f, n_boot, seed + 2, level)

    results: dict[str, Any] = {
        "n_real": n_r,
        "n_fake": n_f,
        "feature_dim": d,
        "ci_level": level,
        "bootstrap": n_boot,
        "fid": {"value": value, "ci": _as_list(fid_ci), "method": fid_method},
        "kid": {**kid_res, "ci": _as_list(kid_ci)},
        "prdc_k": k,
    }
    for key, val in prdc_vals.items():
        results[key] = {"value": val, "ci": _as_list(prdc_ci.get(key))}
    return results, warnings


def _as_list(ci: tuple[float, float] | None) -> list[float] | None:
    """CIs as JSON lists; None when no bootstrap was asked for."""
    return list(ci) if ci is not None else None
