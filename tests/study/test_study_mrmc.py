"""MRMC (Obuchowski-Rockette, Hillis df): a hand-checked example, simulations, and (when the data
are at hand) MRMCaov's published VanDyke results."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from synthcxr.study.mrmc import or_analysis, tost


def test_hand_checked_jackknife_example():
    """2 readers, 2 positive + 2 negative cases. Reader A: AUC 3.5/4, leave-one-out AUCs .75 1 .75 1;
    reader B: 1.5/4, leave-one-out .25 .5 0 .75. Jackknife (n-1)/n sum of products: var A 0.046875,
    var B 0.234375, cov 0.09375; MS(R) = 0.125; SE^2 = MS(R)/2 + cov2; Hillis df = (MS(R) + 2 cov2)^2 / MS(R)^2."""
    ratings = {"A": {"p1": 3, "p2": 2, "n1": 1, "n2": 2}, "B": {"p1": 2, "p2": 1, "n1": 1, "n2": 3}}
    rows = [{"reader": r, "test": "m", "case": c, "truth": int(c[0] == "p"), "rating": v}
            for r, cases in ratings.items() for c, v in cases.items()]
    res = or_analysis(rows, "empirical_auc", "jackknife")
    assert res["fom"]["m"] == {"A": 0.875, "B": 0.375}
    one = res["tests"]["m"]
    assert one["error"] == pytest.approx((0.046875 + 0.234375) / 2)
    assert one["cov2"] == pytest.approx(0.09375)
    assert one["ms_r"] == pytest.approx(0.125)
    assert one["se"] == pytest.approx(math.sqrt(0.125 / 2 + 0.09375))
    assert one["df"] == pytest.approx(6.25)
    assert one["estimate"] == pytest.approx(0.625)


def _simulate(rng: np.random.Generator, skill: float, readers: int = 5, cases: int = 40,
              paired: bool = False) -> list[dict]:
    """Readers rate real (truth 0) and synthetic (truth 1) images; each image has its own look
    (a case effect every reader sees) and each reader their own bias; `skill` moves the synthetic
    images' ratings up. skill = 0: readers at chance."""
    rows = []
    case_effect = rng.normal(0, 1, cases)
    truth = np.arange(cases) % 2
    for r in range(readers):
        bias = rng.normal(0, 0.5)
        latent = case_effect + bias + skill * truth + rng.normal(0, 1, cases)
        if paired:  # 2AFC: one pair per case; correct when the synthetic one looks more synthetic
            correct = (skill + rng.normal(0, 1.2, cases) + 0.5 * case_effect) > 0
            rows += [{"reader": r, "test": "m", "case": c, "truth": 1, "rating": float(correct[c])}
                     for c in range(cases)]
        else:
            rating = np.clip(np.rint(latent + 3), 1, 5)
            rows += [{"reader": r, "test": "m", "case": c, "truth": int(truth[c]), "rating": float(rating[c])}
                     for c in range(cases)]
    return rows


@pytest.mark.parametrize("paired", [False, True], ids=["ratings-auc", "2afc"])
def test_chance_readers_ci_covers_half_and_skill_is_detected(paired):
    rng = np.random.default_rng(0)
    metric = "proportion_correct" if paired else "empirical_auc"
    n_sim = 300
    covered = sum(lo <= 0.5 <= hi for lo, hi in
                  (or_analysis(_simulate(rng, 0.0, paired=paired), metric)["tests"]["m"]["ci"] for _ in range(n_sim)))
    assert covered / n_sim >= 0.90, f"CI covered 0.5 in only {covered}/{n_sim} chance studies"
    detected = sum(or_analysis(_simulate(rng, 1.5, paired=paired), metric)["tests"]["m"]["ci"][0] > 0.5
                   for _ in range(50))
    assert detected >= 45, f"planted skill detected in only {detected}/50 studies"


def test_tost_equivalence():
    """Chance readers on many images: AUC within 0.5 +- 0.1 is shown; skilled readers are not."""
    rng = np.random.default_rng(1)
    chance = or_analysis(_simulate(rng, 0.0, readers=8, cases=400), "empirical_auc")["tests"]["m"]
    skilled = or_analysis(_simulate(rng, 1.5, readers=8, cases=400), "empirical_auc")["tests"]["m"]
    assert tost(chance["estimate"], chance["se"], chance["df"], delta=0.1)["equivalent"]
    assert not tost(skilled["estimate"], skilled["se"], skilled["df"], delta=0.1)["equivalent"]
    # the TOST p-value is the larger one-sided p, and equivalence is the 90% CI inside the margin
    res = tost(0.52, 0.01, 20, delta=0.05)
    assert res["p"] == pytest.approx(max(res["p_lower"], res["p_upper"]))
    assert res["equivalent"] == (res["ci90"][0] > 0.45 and res["ci90"][1] < 0.55)


def test_readers_missing_a_test_are_refused():
    rows = [{"reader": "a", "test": "x", "case": 1, "truth": 1, "rating": 1},
            {"reader": "b", "test": "y", "case": 1, "truth": 1, "rating": 1}]
    with pytest.raises(ValueError, match="every reader to read every test"):
        or_analysis(rows, "proportion_correct")


# --- MRMCaov's published VanDyke results (Smith, Hillis & Pesce, MRMCaov JSS paper) ---------------

VANDYKE = os.environ.get("SYNTHCXR_MRMC_VANDYKE")

PUBLISHED = {
    # (metric, cov): variance components, global test, each test's own CI
    ("empirical_auc", "DeLong"): {
        "reader": 0.0015364254, "test_reader": 0.0002045840, "error": 0.0007921325, "cov1": 0.0003420090,
        "cov2": 0.0003395265, "cov3": 0.0002358497, "F": 4.484854, "df2": 15.06611, "p": 0.05123303,
        "diff": -0.04380032, "diff_se": 0.0206825, "diff_ci": (-0.0878671960, 0.0002665519),
        "tests": {"1": (0.8970370, 0.03307642, 12.59597, 0.8253461, 0.9687280),
                  "2": (0.9408374, 0.02150464, 12.56530, 0.8942155, 0.9874592)},
    },
    ("empirical_auc", "jackknife"): {  # covariances as printed in the fixed-readers example
        "error": 0.0008022883, "cov1": 0.0003466137, "cov2": 0.0003440748, "cov3": 0.0002390284,
        "reader": 0.0015349993, "test_reader": 0.0002004025,
    },
    ("binary_sens", "jackknife"): {
        "reader": 0.0049747475, "test_reader": 0.0007828283, "error": 0.0023681257, "cov1": 0.0009943883,
        "cov2": 0.0010145903, "cov3": 0.0006604938, "F": 6.689493, "df2": 15.71732, "p": 0.02008822,
        "diff": -0.09777778, "diff_se": 0.03780451, "diff_ci": (-0.1780371, -0.0175185),
        "tests": {"1": (0.8222222, 0.05893747, 14.456811, 0.6961876, 0.9482568),
                  "2": (0.9200000, 0.03741657, 7.575855, 0.8328691, 1.0)},
    },
}


def _vandyke_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".rdata":
        pyreadr = pytest.importorskip("pyreadr", reason="reading VanDyke.RData needs `pip install pyreadr`")
        frame = pyreadr.read_r(str(path))["VanDyke"]
        records = frame.to_dict("records")
    else:
        import csv

        with path.open(newline="") as fh:
            records = list(csv.DictReader(fh))
    return [{"reader": str(r["reader"]), "test": str(r["treatment"]), "case": str(r["case"]),
             "truth": int(r["truth"]), "rating": float(r["rating"])} for r in records]


@pytest.mark.skipif(not VANDYKE, reason="set SYNTHCXR_MRMC_VANDYKE to MRMCaov's VanDyke data (.RData or .csv "
                                        "with reader, treatment, case, truth, rating) to compare with its "
                                        "published results")
@pytest.mark.parametrize("metric,cov", list(PUBLISHED))
def test_matches_mrmcaov_vandyke(metric, cov):
    rows = _vandyke_rows(Path(VANDYKE))
    if metric == "binary_sens":
        rows = [dict(r, rating=float(r["rating"] >= 3)) for r in rows]
    res = or_analysis(rows, metric, cov)
    ref = PUBLISHED[(metric, cov)]
    tol = 1e-6  # the published numbers have 7 significant digits; the requirement is 1e-3
    for key in ("reader", "test_reader", "error", "cov1", "cov2", "cov3"):
        assert res["variance_components"][key] == pytest.approx(ref[key], abs=tol), key
    if "F" not in ref:
        return
    assert res["global"]["F"] == pytest.approx(ref["F"], abs=1e-5)
    assert res["global"]["df2"] == pytest.approx(ref["df2"], abs=1e-4)
    assert res["global"]["p"] == pytest.approx(ref["p"], abs=tol)
    pair = res["pairwise"][0]
    assert pair["estimate"] == pytest.approx(ref["diff"], abs=tol)
    assert pair["se"] == pytest.approx(ref["diff_se"], abs=tol)
    assert pair["ci"] == pytest.approx(ref["diff_ci"], abs=tol)
    for test, (est, se, df, lo, hi) in ref["tests"].items():
        got = res["tests"][test]
        assert (got["estimate"], got["se"], got["ci"][0], got["ci"][1]) == pytest.approx((est, se, lo, hi), abs=tol)
        assert got["df"] == pytest.approx(df, abs=1e-4)
