"""Fidelity metrics on feature arrays: FID, KID, precision/recall/density/coverage, jackknife CIs.

All functions take `real` (N x D) and `fake` (M x D) features and know nothing about images.

FID  = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2)  (Heusel et al. 2017).
       `method="sqrtm"`: scipy.linalg.sqrtm of S_r S_f (the reference, as pytorch-fid/clean-fid).
       `method="svd"`: the same trace computed exactly as the nuclear norm of A B^T / sqrt((N-1)(M-1))
       with A, B the centred feature matrices (the eigenvalues of S_r S_f are the squared singular
       values of that matrix). It never forms a D x D square root, is numerically stable for the
       rank-deficient covariances of small sets, and is what the jackknife uses (fast).
KID  = unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al.
       2018), averaged over random subsets, as torchmetrics/clean-fid do.
PRDC = Naeem et al. 2020 with k nearest neighbours in Euclidean feature space (k=5 by default, as
       CheXGenBench), identical to the `prdc` reference package.
CMMD = 1000 * MMD^2 with the Gaussian kernel exp(-||x - y||^2 / (2 * 10^2)) on CLIP embeddings
       (Jayasumana et al. 2024), the plug-in estimate over all pairs as google-research/cmmd's
       `distance.mmd` computes it (its scale and sigma; `cmmd`).
CIs  = two-sample delete-a-group jackknife (see `jackknife_intervals`). Not the bootstrap: resampling
       with replacement puts duplicate images into KID's within-set kernel sums, FID's covariances
       and the k-NN radii (a duplicate is its own neighbour at distance 0), so bootstrap replicates
       are biased and their percentile intervals can miss the estimate entirely (two halves of one
       real set got a KID interval that excluded 0). Leaving images out never duplicates one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import scipy.stats

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
    """Kernel matrices of the full sets, computed once; subsets and jackknife replicates only index them."""

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


class PRDCDistances:
    """Pairwise distances of the full sets, computed once; `values` recomputes PRDC on any subsets.

    The k-NN manifolds (radii) are recomputed from the kept images only, so a jackknife replicate is
    exactly PRDC of a smaller set (no image is ever duplicated: duplicates sit at distance 0 from
    each other and would shrink the radii).
    """

    def __init__(self, real: np.ndarray, fake: np.ndarray, k: int = 5):
        _check(real, fake, k + 1, f"precision/recall/density/coverage (k={k})")
        self.k = k
        self.d_rr = _pairwise(real, real)
        self.d_ff = _pairwise(fake, fake)
        self.d_rf = _pairwise(real, fake)

    def values(self, idx_r: np.ndarray | None = None, idx_f: np.ndarray | None = None) -> dict[str, float]:
        d_rr, d_ff, d_rf = self.d_rr, self.d_ff, self.d_rf
        if idx_r is not None:
            d_rr, d_rf = d_rr[np.ix_(idx_r, idx_r)], d_rf[idx_r]
        if idx_f is not None:
            d_ff, d_rf = d_ff[np.ix_(idx_f, idx_f)], d_rf[:, idx_f]
        real_radii = _kth_neighbour_distance(d_rr, self.k)
        fake_radii = _kth_neighbour_distance(d_ff, self.k)
        inside_real = d_rf < real_radii[:, None]  # fake j inside real i's ball
        return {
            "precision": float(inside_real.any(axis=0).mean()),
            "recall": float((d_rf < fake_radii[None, :]).any(axis=1).mean()),
            "density": float(inside_real.sum(axis=0).mean() / self.k),
            "coverage": float((d_rf.min(axis=1) < real_radii).mean()),
        }


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    return PRDCDistances(real, fake, k).values()


CI_METHOD = ("two-sample delete-a-group jackknife: estimate +/- t * SE, SE^2 = sum over both sets of "
             "(G-1)/G * sum_g (theta_(-g) - mean_g theta_(-g))^2 with each set split into G random groups, "
             "t with Welch-Satterthwaite degrees of freedom")

#: The range each statistic lives in: interval ends outside it are clipped (the estimate always lies inside).
#: KID is not clipped below: its unbiased estimate is negative when the sets are alike, and the interval must hold it.
_RANGES = {"fid": (0.0, np.inf), "cmmd": (0.0, np.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0), "density": (0.0, np.inf),
           "coverage": (0.0, 1.0)}


def jackknife_parts(n_real: int, n_fake: int, groups: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The random near-equal groups (min(n, `groups`) of them) each set is split into for the jackknife;
    one draw for every caller, so the in-memory and the blocked computations leave out the same images."""
    rng = np.random.default_rng(seed)
    real_parts = np.array_split(rng.permutation(n_real), min(n_real, groups))
    fake_parts = np.array_split(rng.permutation(n_fake), min(n_fake, groups))
    return real_parts, fake_parts


def jackknife_intervals(stat: Callable[[np.ndarray, np.ndarray], dict[str, float]], estimate: dict[str, float],
                        n_real: int, n_fake: int, groups: int, seed: int = 0, level: float = 0.95,
                        extra_var: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Approximate `level` confidence intervals by the two-sample delete-a-group jackknife.

    What an interval means: `estimate +/- t * SE` is an approximate `level` confidence interval for
    the statistic's expected value at these set sizes (the average over fresh draws of `n_real` real
    and `n_fake` synthetic images from the same sources). For KID and PRDC that is the population
    value (KID is unbiased); FID is biased upward at finite sizes, so its interval is for the FID
    expected *at these sizes*, not the infinite-set FID. It covers the randomness of which images were
    drawn (both sets), not the choice of extractor, model seed or hyperparameters.

    How: each set is split into G = min(n, `groups`) random groups of near-equal size; `stat` is
    recomputed with one group of one set left out (the other set whole), giving theta_(-g); the
    jackknife variance SE^2 = sum over the two sets of (G-1)/G sum_g (theta_(-g) - mean)^2 (with
    `extra_var` added, e.g. the Monte-Carlo variance of KID's subset average). The jackknife variance
    tends to err on the large side (Efron & Stein 1981), the safe side for "is this difference real".
    t is Student's quantile with Welch-Satterthwaite degrees of freedom. Interval ends are clipped to
    the statistic's range (`_RANGES`), never past the estimate. G = n is the classic delete-1
    jackknife; fewer groups bound the cost at 2G evaluations of `stat`.
    """
    all_r, all_f = np.arange(n_real), np.arange(n_fake)
    replicates: list[tuple[int, dict[str, list[float]]]] = []  # per set: (G, key -> theta_(-g))
    leaves = ((n_real, lambda keep: stat(keep, all_f)), (n_fake, lambda keep: stat(all_r, keep)))
    for (n, leave), parts in zip(leaves, jackknife_parts(n_real, n_fake, groups, seed), strict=True):
        draws: dict[str, list[float]] = {}
        for part in parts:
            keep = np.sort(np.setdiff1d(np.arange(n), part, assume_unique=True))
            for key, val in leave(keep).items():
                draws.setdefault(key, []).append(val)
        replicates.append((len(parts), draws))
    out: dict[str, dict[str, Any]] = {}
    for key, value in estimate.items():
        var_parts = []
        for g, draws in replicates:
            theta = np.asarray(draws[key], np.float64)
            var_parts.append(((g - 1) / g * ((theta - theta.mean()) ** 2).sum(), g - 1))
        var = sum(v for v, _ in var_parts) + (extra_var or {}).get(key, 0.0)
        denom = sum(v * v / df for v, df in var_parts if df > 0)
        df = var * var / denom if denom > 0 else np.inf
        se = float(np.sqrt(var))
        t = float(scipy.stats.t.ppf(0.5 + level / 2.0, df)) if np.isfinite(df) else float(scipy.stats.norm.ppf(0.5 + level / 2.0))
        lo_range, hi_range = _RANGES.get(key, (-np.inf, np.inf))
        low = max(value - t * se, min(lo_range, value))
        high = min(value + t * se, max(hi_range, value))
        out[key] = {"ci": [float(low), float(high)], "se": se}
    return out


def fidelity_metrics(real: np.ndarray, fake: np.ndarray, *, fid_method: str = "svd", kid_subsets: int = 100,
                     kid_subset_size: int = 1000, k: int = 5, ci_groups: int = 20, level: float = 0.95,
                     seed: int = 0, memory_limit: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """FID, KID and PRDC with jackknife CIs (`jackknife_intervals` says what they mean), plus warnings.

    `ci_groups`: jackknife groups per set (0 = no intervals); each statistic is recomputed 2G times.
    `memory_limit`: bytes of N x N matrices beyond which KID/PRDC run in blocks (`bounded.py`, same numbers).
    """
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
    from synthcxr.evaluate.bounded import pairwise_stats

    kernels, distances = pairwise_stats(real, fake, k, groups=ci_groups, seed=seed, limit=memory_limit)
    kid_res = kid(real, fake, kid_subsets, kid_subset_size, seed, kernels=kernels)
    if kid_res["subset_size_capped"]:
        warnings.append(f"KID subset size capped at {kid_res['subset_size']} (the smaller set)")
    prdc_vals = distances.values()

    intervals: dict[str, dict[str, Any]] = {}
    # a replicate leaves out ceil(n / G) images; PRDC then still needs k + 1 per set
    smallest_left = min(n - -(-n // min(n, ci_groups)) for n in (n_r, n_f)) if ci_groups > 0 else 0
    if ci_groups > 0 and smallest_left < k + 1:
        warnings.append(f"no confidence intervals: a jackknife replicate would keep {smallest_left} images of a set, "
                        f"fewer than the k + 1 = {k + 1} PRDC needs (add images)")
    elif ci_groups > 0:
        # the reported KID averages random subsets: add that average's Monte-Carlo variance to the jackknife's
        mc_var = kid_res["std"] ** 2 / (kid_subsets - 1) if kid_subsets > 1 else 0.0

        def stat(ir: np.ndarray, jf: np.ndarray) -> dict[str, float]:
            return {"fid": fid(real[ir], fake[jf], "svd"), "kid": kernels.mmd2(ir, jf), **distances.values(ir, jf)}

        intervals = jackknife_intervals(stat, {"fid": value, "kid": kid_res["mean"], **prdc_vals}, n_r, n_f,
                                        ci_groups, seed, level, extra_var={"kid": mc_var})

    results: dict[str, Any] = {
        "n_real": n_r,
        "n_fake": n_f,
        "feature_dim": d,
        "ci_level": level,
        "ci_method": CI_METHOD if intervals else None,
        "ci_groups": {"real": min(n_r, ci_groups), "synthetic": min(n_f, ci_groups)} if intervals else None,
        "fid": {"value": value, "method": fid_method, **_interval(intervals, "fid")},
        "kid": {**kid_res, **_interval(intervals, "kid")},
        "prdc_k": k,
    }
    for key, val in prdc_vals.items():
        results[key] = {"value": val, **_interval(intervals, key)}
    return results, warnings


CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def rbf_kernel(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA) -> np.ndarray:
    """exp(-||x - y||^2 / (2 sigma^2)) for every pair of rows."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.exp(-np.clip(sq, 0, None) / (2.0 * sigma * sigma))


class RBFKernelMatrices:
    """Gaussian kernel matrices of the full sets; `cmmd(ir, jf)` is CMMD of any subsets (jackknife)."""

    def __init__(self, real: np.ndarray, fake: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE):
        self.scale = scale
        self.k_rr, self.k_ff, self.k_rf = rbf_kernel(real, real, sigma), rbf_kernel(fake, fake, sigma), rbf_kernel(real, fake, sigma)

    def cmmd(self, idx_r: np.ndarray | None = None, idx_f: np.ndarray | None = None) -> float:
        k_rr, k_ff, k_rf = self.k_rr, self.k_ff, self.k_rf
        if idx_r is not None:
            k_rr, k_rf = k_rr[np.ix_(idx_r, idx_r)], k_rf[idx_r]
        if idx_f is not None:
            k_ff, k_rf = k_ff[np.ix_(idx_f, idx_f)], k_rf[:, idx_f]
        return float(self.scale * (k_rr.mean() + k_ff.mean() - 2.0 * k_rf.mean()))


def cmmd(real: np.ndarray, fake: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD between two sets of (L2-normalised CLIP) embeddings: scale * MMD^2 with a Gaussian kernel,
    all pairs including i = j, as the reference implementation (it is >= 0 and ~0 for one distribution)."""
    _check(real, fake, 1, "CMMD")
    return RBFKernelMatrices(real, fake, sigma, scale).cmmd()


def cmmd_metric(real: np.ndarray, fake: np.ndarray, *, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE,
                ci_groups: int = 20, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """CMMD with a jackknife interval (`jackknife_intervals`) for the JSON."""
    _check(real, fake, 2, "CMMD")
    kernels = RBFKernelMatrices(real, fake, sigma, scale)
    value = kernels.cmmd()
    intervals = jackknife_intervals(lambda ir, jf: {"cmmd": kernels.cmmd(ir, jf)}, {"cmmd": value}, len(real), len(fake),
                                    ci_groups, seed, level) if ci_groups > 0 else {}
    return {"value": value, "sigma": sigma, "scale": scale, "n_real": len(real), "n_fake": len(fake),
            "estimator": "plug-in MMD^2 over all pairs (google-research/cmmd distance.mmd)", "ci_level": level,
            **_interval(intervals, "cmmd")}


def _interval(intervals: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """{"ci": [low, high], "se": SE} for the JSON; nulls when no intervals were asked for."""
    return intervals.get(key, {"ci": None, "se": None})
