"""Multi-reader multi-case (MRMC) analysis: Obuchowski-Rockette (OR) with Hillis' degrees of freedom.

Readers and cases are both random: a reader-study result should hold for other readers and other
images. Each reader's figure of merit (FOM: empirical ROC AUC, or the proportion correct of a
two-alternative forced choice, which is the 2AFC AUC) is computed per test (here: per model), the
covariances of those FOMs over cases are estimated (jackknife, or DeLong for the empirical AUC) and
fed into the OR ANOVA as R's `MRMCaov` does (Hillis 2007, "A comparison of denominator degrees of
freedom methods for multiple observer ROC analysis"). The numbers agree with MRMCaov's published
VanDyke example (see tests/study/test_study_mrmc.py).

Input is long format, one row per reading: reader, test, case, truth (1 = positive), rating (higher
= more likely positive), the format MRMCaov and iMRMC read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

METRICS = ("empirical_auc", "proportion_correct", "binary_sens")
COV_METHODS = ("jackknife", "DeLong")


@dataclass
class Readings:
    """Long-format readings as arrays (one entry per reading)."""

    reader: np.ndarray
    test: np.ndarray
    case: np.ndarray
    truth: np.ndarray
    rating: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> Readings:
        return cls(*(np.asarray([r[k] for r in rows], dtype=object if k in ("reader", "test", "case") else float)
                     for k in ("reader", "test", "case", "truth", "rating")))


def _psi(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney kernel: 1 if the positive is rated higher, 1/2 on a tie."""
    diff = pos[:, None] - neg[None, :]
    return (diff > 0) + 0.5 * (diff == 0)


class _Cell:
    """One reader x test: its FOM and the FOM with each of its cases left out (the jackknife)."""

    def __init__(self, cases: np.ndarray, truth: np.ndarray, rating: np.ndarray, metric: str) -> None:
        self.cases = cases
        if metric == "empirical_auc":
            pos, neg = truth == 1, truth != 1
            psi = _psi(rating[pos], rating[neg])
            m, n = psi.shape
            total = psi.sum()
            self.fom = total / (m * n) if m and n else math.nan
            loo = np.empty(len(cases))
            loo[pos] = (total - psi.sum(axis=1)) / ((m - 1) * n) if m > 1 else math.nan
            loo[neg] = (total - psi.sum(axis=0)) / (m * (n - 1)) if n > 1 else math.nan
            self.loo = loo
            # DeLong structural components (per positive: V10, per negative: V01)
            self.v10 = dict(zip(cases[pos], psi.mean(axis=1), strict=True)) if n else {}
            self.v01 = dict(zip(cases[neg], psi.mean(axis=0), strict=True)) if m else {}
        elif metric in ("proportion_correct", "binary_sens"):
            keep = truth == 1 if metric == "binary_sens" else np.ones(len(cases), bool)
            self.cases = cases = cases[keep]
            correct = (rating[keep] > 0).astype(float) if metric == "proportion_correct" else rating[keep].astype(float)
            k = len(correct)
            self.fom = correct.mean() if k else math.nan
            self.loo = (correct.sum() - correct) / (k - 1) if k > 1 else np.full(k, math.nan)
        else:
            raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def _cells(data: Readings, metric: str) -> tuple[list, list, dict[tuple[Any, Any], _Cell]]:
    tests = list(dict.fromkeys(data.test.tolist()))
    readers = list(dict.fromkeys(data.reader.tolist()))
    cells = {}
    for t in tests:
        for r in readers:
            sel = (data.test == t) & (data.reader == r)
            if not sel.any():
                raise ValueError(f"reader {r!r} has no readings for test {t!r}: the OR analysis needs every "
                                 "reader to read every test")
            cells[(t, r)] = _Cell(data.case[sel], data.truth[sel], data.rating[sel], metric)
    return tests, readers, cells


def _jackknife_cov(keys: list, cells: dict, all_cases: list) -> np.ndarray:
    """Jackknife covariance over cases of every pair of cells; a case a cell does not contain leaves
    its FOM unchanged."""
    index = {c: i for i, c in enumerate(all_cases)}
    n = len(all_cases)
    loo = np.empty((len(keys), n))
    for a, key in enumerate(keys):
        cell = cells[key]
        loo[a, :] = cell.fom
        loo[a, [index[c] for c in cell.cases]] = cell.loo
    centred = loo - loo.mean(axis=1, keepdims=True)
    return (n - 1) / n * centred @ centred.T


def _delong_cov(keys: list, cells: dict) -> np.ndarray:
    """DeLong et al. (1988): covariances from the structural components (same cases in every cell)."""
    pos = sorted(cells[keys[0]].v10, key=str)
    neg = sorted(cells[keys[0]].v01, key=str)
    for key in keys:
        if set(cells[key].v10) != set(pos) or set(cells[key].v01) != set(neg):
            raise ValueError("the DeLong covariance needs every reader to read the same cases in every test; "
                             "use cov='jackknife'")
    v10 = np.array([[cells[k].v10[c] for c in pos] for k in keys])
    v01 = np.array([[cells[k].v01[c] for c in neg] for k in keys])
    return np.cov(v10) / len(pos) + np.cov(v01) / len(neg)


def _or_covariances(cov: np.ndarray, keys: list) -> dict[str, float]:
    """Average the covariance matrix into OR's error variance and Cov1 (same reader, other test),
    Cov2 (other reader, same test) and Cov3 (other reader, other test)."""
    sums = {"error": [], "cov1": [], "cov2": [], "cov3": []}
    for a, (ta, ra) in enumerate(keys):
        for b, (tb, rb) in enumerate(keys):
            kind = "error" if a == b else "cov1" if ra == rb else "cov2" if ta == tb else "cov3"
            sums[kind].append(cov[a, b])
    return {k: float(np.mean(v)) if v else math.nan for k, v in sums.items()}


def or_analysis(data: Readings | Sequence[dict[str, Any]], metric: str = "empirical_auc", cov: str = "jackknife",
                level: float = 0.95) -> dict[str, Any]:
    """Obuchowski-Rockette analysis, random readers and random cases (Hillis df), as MRMCaov's
    `summary(mrmc(...))`: FOM per reader and test, variance components, the global F test of equal
    tests, pairwise differences and each test's own CI (from that test's data only)."""
    if not isinstance(data, Readings):
        data = Readings.from_rows(data)
    if cov not in COV_METHODS:
        raise ValueError(f"unknown covariance method {cov!r}; use one of {', '.join(COV_METHODS)}")
    if cov == "DeLong" and metric != "empirical_auc":
        raise ValueError("the DeLong covariance is for the empirical AUC only; use cov='jackknife'")
    tests, readers, cells = _cells(data, metric)
    t, r = len(tests), len(readers)
    keys = [(tt, rr) for tt in tests for rr in readers]
    # jackknife over the cases some FOM depends on (binary_sens: the positives only), as MRMCaov does
    all_cases = list(dict.fromkeys(c for k in keys for c in cells[k].cases.tolist()))
    covariance = _delong_cov(keys, cells) if cov == "DeLong" else _jackknife_cov(keys, cells, all_cases)
    fom = np.array([[cells[(tt, rr)].fom for rr in readers] for tt in tests])  # t x r
    c = _or_covariances(covariance, keys)
    test_mean, reader_mean, grand = fom.mean(axis=1), fom.mean(axis=0), fom.mean()
    ms_t = r * ((test_mean - grand) ** 2).sum() / (t - 1) if t > 1 else math.nan
    ms_r = t * ((reader_mean - grand) ** 2).sum() / (r - 1) if r > 1 else math.nan
    resid = fom - test_mean[:, None] - reader_mean[None, :] + grand
    ms_tr = (resid ** 2).sum() / ((t - 1) * (r - 1)) if t > 1 and r > 1 else math.nan
    var_tr = ms_tr - c["error"] + c["cov1"] + c["cov2"] - c["cov3"] if t > 1 else math.nan
    between = (var_tr + (t - 1) * (c["cov1"] - c["cov3"])) if t > 1 else 0.0
    var_r = (ms_r - between - c["error"] + c["cov2"]) / t

    result: dict[str, Any] = {
        "metric": metric, "cov_method": cov, "n_readers": r, "n_tests": t, "n_cases": len(all_cases),
        "level": level,
        "fom": {str(tt): {str(rr): float(cells[(tt, rr)].fom) for rr in readers} for tt in tests},
        "variance_components": {"reader": var_r, "test_reader": var_tr, **c},
        "ms": {"test": ms_t, "reader": ms_r, "test_reader": ms_tr},
    }
    if t > 1:
        denom = ms_tr + r * max(c["cov2"] - c["cov3"], 0.0)
        f = ms_t / denom
        df2 = denom ** 2 / (ms_tr ** 2 / ((t - 1) * (r - 1)))
        result["global"] = {"F": f, "df1": t - 1, "df2": df2, "p": float(stats.f.sf(f, t - 1, df2)),
                            "denominator": denom}
        se = math.sqrt(2 * denom / r)
        tq = stats.t.ppf(0.5 + level / 2, df2)
        pairs = []
        for a in range(t):
            for b in range(a + 1, t):
                est = float(test_mean[a] - test_mean[b])
                tstat = est / se
                pairs.append({"comparison": f"{tests[a]} - {tests[b]}", "estimate": est, "se": se, "df": df2,
                              "ci": (est - tq * se, est + tq * se), "t": tstat,
                              "p": float(2 * stats.t.sf(abs(tstat), df2))})
        result["pairwise"] = pairs
    result["tests"] = {str(tt): _single_test(tt, readers, cells, all_cases, cov, level) for tt in tests}
    return result


def _single_test(test: Any, readers: list, cells: dict, all_cases: list, cov: str, level: float) -> dict[str, Any]:
    """One test's mean FOM with its own OR CI (MS(R) and Cov2 from this test's data only)."""
    keys = [(test, rr) for rr in readers]
    used = {c for k in keys for c in cells[k].cases.tolist()}
    cases = [c for c in all_cases if c in used]
    covariance = _delong_cov(keys, cells) if cov == "DeLong" else _jackknife_cov(keys, cells, cases)
    c = _or_covariances(covariance, keys)
    fom = np.array([cells[k].fom for k in keys])
    r = len(readers)
    est = float(fom.mean())
    ms_r = float(((fom - est) ** 2).sum() / (r - 1)) if r > 1 else math.nan
    cov2 = max(c["cov2"], 0.0) if r > 1 else 0.0
    if r > 1:
        var = ms_r / r + cov2
        df = (ms_r + r * cov2) ** 2 / (ms_r ** 2 / (r - 1)) if ms_r > 0 else math.inf
    else:  # one reader: cases random only
        var, df, ms_r = c["error"], math.inf, math.nan
    se = math.sqrt(var)
    q = stats.t.ppf(0.5 + level / 2, df) if math.isfinite(df) else stats.norm.ppf(0.5 + level / 2)
    ci = (max(0.0, est - q * se), min(1.0, est + q * se))  # every metric here lies in [0, 1]
    return {"estimate": est, "ms_r": ms_r, "cov2": c["cov2"], "error": c["error"], "se": se, "df": df,
            "ci": ci, "n_cases": len(cases)}


def tost(estimate: float, se: float, df: float, center: float = 0.5, delta: float = 0.05,
         alpha: float = 0.05) -> dict[str, Any]:
    """Two one-sided tests: is the FOM within center ± delta ("indistinguishable from real" when the
    FOM is the readers' AUC for telling the model from real)? Equivalent when p < alpha, i.e. when
    the (1 - 2 alpha) CI lies inside the margin."""
    if not (math.isfinite(se) and se > 0):
        return {"center": center, "delta": delta, "p": math.nan, "equivalent": False, "ci90": (math.nan, math.nan)}
    dist = stats.t(df) if math.isfinite(df) else stats.norm()
    p_low = float(dist.sf((estimate - (center - delta)) / se))
    p_high = float(dist.sf(((center + delta) - estimate) / se))
    q = dist.ppf(1 - alpha)
    p = max(p_low, p_high)
    return {"center": center, "delta": delta, "alpha": alpha, "p_lower": p_low, "p_upper": p_high, "p": p,
            "equivalent": bool(p < alpha), "ci90": (estimate - q * se, estimate + q * se)}
