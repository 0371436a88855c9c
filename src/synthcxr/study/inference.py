"""Inference over a study's answers with readers and images random: MRMC AUC per model with the
equivalence test, the paired design's proportion correct, time per case, and a mixed model of the
realism ratings. Rows are `service.ratings_table` dicts (main-phase first showings).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from synthcxr.study.mrmc import or_analysis, tost

REAL = "real"
Z95 = 1.959963984540054
MRMC_COLUMNS = ["reader", "case", "modality", "truth", "rating"]


def suspicion(row: dict[str, Any]) -> float | None:
    """How strongly a reader called an image synthetic (higher = more synthetic): choice x
    confidence (-3..3) when asked, else the realism scale reversed (-5..-1)."""
    if row.get("judged_real") is not None:
        conf = row.get("confidence") or 1
        return float(-conf if row["judged_real"] else conf)
    if row.get("realism") is not None:
        return float(-row["realism"])
    return None


def mrmc_readings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long format (reader, case, modality, truth, rating) as MRMCaov and iMRMC read it.

    Single design: one modality per model; its cases are the real controls (truth 0) and the
    model's images (truth 1), rating = how synthetic the reader called it (a real control appears
    under every modality with the same reading). Paired design: case = the pair, truth 1, rating 1
    when the reader picked the synthetic image, else 0 (the mean is the 2AFC AUC)."""
    out = []
    models = sorted({r["model"] for r in rows if r.get("design") != "paired" and r["source"] != REAL})
    for r in rows:
        if r.get("design") == "paired":
            case = "|".join(sorted((r["image_id"], r["image2_id"])))
            out.append({"reader": r["reader"], "case": case, "modality": r["model"], "truth": 1,
                        "rating": 1.0 if r["correct"] else 0.0})
            continue
        score = suspicion(r)
        if score is None:
            continue
        for model in (models if r["source"] == REAL else [r["model"]]):
            out.append({"reader": r["reader"], "case": r["image_id"], "modality": model,
                        "truth": int(r["source"] != REAL), "rating": score})
    return out


def _complete_readers(readings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Readers who have readings under every modality (OR needs reader x modality complete)."""
    modalities = {r["modality"] for r in readings}
    seen: dict[str, set] = {}
    for r in readings:
        seen.setdefault(r["reader"], set()).add(r["modality"])
    keep = {rd for rd, mods in seen.items() if mods == modalities}
    return [r for r in readings if r["reader"] in keep]


def mrmc_summary(rows: list[dict[str, Any]], delta: float = 0.05, alpha: float = 0.05) -> dict[str, Any]:
    """Per model: readers' AUC (paired: proportion correct) for telling it from real, with the OR
    95% CI (random readers and cases, Hillis df) and the TOST of AUC within 0.5 +- delta; with
    several models, the OR test that all models are equally distinguishable."""
    readings = _complete_readers(mrmc_readings(rows))
    if not readings:
        return {"skipped": "no answers that an MRMC analysis can use yet"}
    paired = any(r.get("design") == "paired" for r in rows)
    metric = "proportion_correct" if paired else "empirical_auc"
    data = [{"reader": r["reader"], "test": r["modality"], "case": r["case"], "truth": r["truth"],
             "rating": r["rating"]} for r in readings]
    try:
        res = or_analysis(data, metric, "jackknife")
    except (ValueError, ZeroDivisionError) as exc:
        return {"skipped": str(exc)}
    models = []
    for model, one in sorted(res["tests"].items()):
        eq = tost(one["estimate"], one["se"], one["df"], 0.5, delta, alpha)
        models.append({"model": model, "auc": one["estimate"], "ci": one["ci"], "se": one["se"], "df": one["df"],
                       "n_readers": res["n_readers"], "n_cases": one["n_cases"],
                       "per_reader": res["fom"][model], "tost_p": eq["p"], "equivalent": eq["equivalent"],
                       "ci90": eq["ci90"]})
    out = {"metric": "2AFC proportion correct (= AUC)" if paired else "empirical AUC (confidence-weighted choice)"
           if any(r.get("judged_real") is not None for r in rows) else "empirical AUC (realism scale)",
           "cov_method": "jackknife", "delta": delta, "alpha": alpha, "models": models,
           "variance_components": res["variance_components"]}
    if "global" in res:
        out["global"] = res["global"]
        out["pairwise"] = res["pairwise"]
    return out


def time_analysis(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per case (visible time the browser measured), for correct vs wrong answers, with a
    Mann-Whitney test and the point-biserial correlation of time with correctness."""
    from scipy.stats import mannwhitneyu, pointbiserialr

    timed = [(r["client_ms"] / 1000, bool(r["correct"])) for r in rows
             if r.get("client_ms") is not None and r.get("correct") is not None]
    if not timed:
        return {"n": 0}
    secs = np.array([t for t, _ in timed])
    ok = np.array([c for _, c in timed])
    out: dict[str, Any] = {"n": len(timed), "median_s": float(np.median(secs)), "mean_s": float(secs.mean()),
                           "median_s_correct": float(np.median(secs[ok])) if ok.any() else math.nan,
                           "median_s_wrong": float(np.median(secs[~ok])) if (~ok).any() else math.nan}
    if ok.any() and (~ok).any():
        out["mannwhitney_p"] = float(mannwhitneyu(secs[ok], secs[~ok]).pvalue)
        if secs.std() > 0:
            out["pointbiserial_r"] = float(pointbiserialr(ok.astype(float), secs).statistic)
    readers = sorted({r["reader"] for r in rows})
    out["per_reader_median_s"] = {rd: float(np.median([r["client_ms"] / 1000 for r in rows
                                                      if r["reader"] == rd and r.get("client_ms") is not None]))
                                  for rd in readers if any(r["reader"] == rd and r.get("client_ms") is not None
                                                           for r in rows)}
    return out


def realism_mixed_model(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Realism by group with readers and images as crossed random intercepts (REML, `mixed.py`):
    each group's mean with a 95% CI, each model's difference from the real controls, and the
    variance components. Beside the image-bootstrap CIs: those ignore the reader variation."""
    from scipy.stats import norm

    from synthcxr.study.mixed import fit_crossed

    rated = [r for r in rows if r.get("realism") is not None and r.get("design") != "paired"]
    groups = sorted({r["model"] for r in rated})
    if len(rated) < 10 or len({r["reader"] for r in rated}) < 2:
        return {"skipped": "needs realism ratings from at least two readers"}
    order = ([REAL] if REAL in groups else []) + [g for g in groups if g != REAL]
    x = np.array([[1.0 if r["model"] == g else 0.0 for g in order] for r in rated])
    try:
        fit = fit_crossed(np.array([float(r["realism"]) for r in rated]), x,
                          {"reader": np.array([r["reader"] for r in rated]),
                           "image": np.array([r["image_id"] for r in rated])})
    except (np.linalg.LinAlgError, ValueError) as exc:
        return {"skipped": f"the mixed model could not be fitted: {exc}"}
    out_groups = []
    for k, group in enumerate(order):
        est, se = float(fit.beta[k]), math.sqrt(fit.cov_beta[k, k])
        item: dict[str, Any] = {"group": group, "mean": est, "ci": (est - Z95 * se, est + Z95 * se), "se": se}
        if order[0] == REAL and k > 0:
            diff = est - float(fit.beta[0])
            dse = math.sqrt(fit.cov_beta[k, k] + fit.cov_beta[0, 0] - 2 * fit.cov_beta[k, 0])
            item.update(diff_vs_real=diff, diff_ci=(diff - Z95 * dse, diff + Z95 * dse),
                        diff_p=float(2 * norm.sf(abs(diff / dse))) if dse > 0 else math.nan)
        out_groups.append(item)
    return {"groups": out_groups, "variance": {**fit.variances, "residual": fit.sigma2},
            "converged": fit.converged, "n": len(rated),
            "method": "linear mixed model, REML, crossed random intercepts for reader and image"}
