"""Analysis statistics against values computed by hand on small fixed tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from synthcxr.study.analysis import (
    analyze,
    auc,
    bootstrap_ci,
    cluster_bootstrap_ci,
    fleiss_kappa,
    holm,
    krippendorff_alpha,
    wilson_ci,
    write_outputs,
)

# reader, image, model, realism, judged_real, finding
_TABLE = [
    ("r1", "i1", "real", 5, True, None), ("r1", "i2", "real", 4, True, None),
    ("r1", "a1", "A", 3, True, "normal"), ("r1", "a2", "A", 2, False, "unsure"),
    ("r1", "b1", "B", 1, False, None), ("r1", "b2", "B", 2, False, None),
    ("r2", "i1", "real", 4, True, None), ("r2", "i2", "real", 4, False, None),
    ("r2", "a1", "A", 3, False, "tuberculosis"), ("r2", "a2", "A", 3, False, "tuberculosis"),
    ("r2", "b1", "B", 2, False, None), ("r2", "b2", "B", 1, False, None),
]
_LABELS = {"a1": "normal", "a2": "tuberculosis"}


def _rows() -> list[dict]:
    rows = []
    for n, (reader, image, model, realism, judged, finding) in enumerate(_TABLE):
        rows.append({"reader": reader, "image_id": image, "model": model,
                     "source": "real" if model == "real" else "synthetic", "realism": realism,
                     "judged_real": judged, "confidence": 2, "finding": finding,
                     "intended_label": _LABELS.get(image), "position": n % 6, "repeat_of_position": None,
                     "client_ms": 1000})
    # repeats: r1 sees i1 again (5 -> 4), r2 sees b1 again (2 -> 2)
    rows.append({**rows[0], "realism": 4, "position": 6, "repeat_of_position": 0})
    rows.append({**rows[10], "realism": 2, "position": 6, "repeat_of_position": 4})
    return rows


def test_wilson_interval_matches_textbook_values():
    assert wilson_ci(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert wilson_ci(3, 4) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    lo, hi = wilson_ci(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-4)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_auc_counts_ties_half():
    assert auc([3, 2], [1, 2]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert math.isnan(auc([], [1]))


def test_fleiss_kappa_wikipedia_example():
    table = np.array([
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ])
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=1e-3)


def test_krippendorff_alpha_reference_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", example with missing data
    nan = None
    data = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    ]
    assert krippendorff_alpha(data, "nominal") == pytest.approx(0.743, abs=1e-3)
    assert krippendorff_alpha(data, "ordinal") == pytest.approx(0.815, abs=1e-3)
    assert krippendorff_alpha(data, "interval") == pytest.approx(0.849, abs=1e-3)


def test_bootstrap_ci_is_seeded_and_sensible():
    values = [1, 2, 3, 4, 5] * 4
    a = bootstrap_ci(values, n_boot=500, seed=3)
    assert a == bootstrap_ci(values, n_boot=500, seed=3)
    assert a[0] < 3.0 < a[1] and a[0] > 2.0 and a[1] < 4.0
    assert bootstrap_ci([4, 4, 4], n_boot=100) == (4.0, 4.0)


def test_cluster_bootstrap_keeps_an_images_ratings_together():
    # two images, each rated identically by every reader: resampling images can only give
    # means of 1, 3 or 5 (never the 2 or 4 a rating-level bootstrap could produce)
    values, clusters = [1, 1, 1, 5, 5, 5], ["a", "a", "a", "b", "b", "b"]
    lo, hi = cluster_bootstrap_ci(values, clusters, n_boot=400, seed=0)
    assert (lo, hi) == (1.0, 5.0)
    assert cluster_bootstrap_ci([2, 4], ["x", "x"], n_boot=50) == (3.0, 3.0)


def test_study_analysis_on_fixed_table():
    result = analyze(_rows(), n_boot=500)
    assert result["n_answers"] == 14 and result["n_first_showings"] == 12
    groups = {g["group"]: g for g in result["groups"]}
    assert [g["group"] for g in result["groups"]] == ["real", "A", "B"]
    # realism means (repeats excluded): (5+4+4+4)/4, (3+2+3+3)/4, (1+2+2+1)/4
    assert groups["real"]["realism_mean"] == pytest.approx(4.25)
    assert groups["A"]["realism_mean"] == pytest.approx(2.75)
    assert groups["B"]["realism_mean"] == pytest.approx(1.5)
    assert groups["real"]["n_ratings"] == 4 and groups["real"]["n_images"] == 2
    # judged real: 3/4, 1/4, 0/4 with Wilson intervals
    lo, hi = groups["real"]["realism_ci"]
    assert 4.0 <= lo <= 4.25 <= hi <= 4.5  # two images with means 4.5 and 4.0
    assert groups["real"]["judged_real_fraction"] == pytest.approx(0.75)
    assert groups["real"]["judged_real_ci"] == pytest.approx([0.3006, 0.9544], abs=1e-4)
    assert groups["A"]["judged_real_fraction"] == pytest.approx(0.25)
    assert groups["B"]["judged_real_fraction"] == 0.0
    # findings on A: 4 answers with a label, 1 unsure, 2 of the 3 decided ones agree
    assert groups["A"]["finding_n"] == 4
    assert groups["A"]["finding_unsure_fraction"] == pytest.approx(0.25)
    assert groups["A"]["finding_agreement"] == pytest.approx(2 / 3)
    assert groups["real"]["finding_agreement"] is None

    readers = {r["reader"]: r for r in result["readers"]}
    assert readers["r1"]["accuracy"] == pytest.approx(5 / 6)
    assert readers["r2"]["accuracy"] == pytest.approx(5 / 6)
    assert readers["all"]["accuracy"] == pytest.approx(10 / 12)
    assert readers["r1"]["sensitivity_synthetic"] == pytest.approx(0.75)
    assert readers["r1"]["specificity_real"] == pytest.approx(1.0)
    assert readers["r2"]["sensitivity_synthetic"] == pytest.approx(1.0)
    assert readers["r2"]["specificity_real"] == pytest.approx(0.5)
    # AUC of choice x confidence: r1 7/8 (a1 ties both reals), r2 6/8 (i2 ties every synthetic)
    assert readers["r1"]["auc"] == pytest.approx(0.875)
    assert readers["r2"]["auc"] == pytest.approx(0.75)
    assert readers["r1"]["auc_realism"] == pytest.approx(1.0)

    inter = result["inter_reader"]
    # realism: P-bar = 2/6, P_e = (4+9+9+9+1)/144 -> kappa = 1/7
    assert inter["realism"]["fleiss_kappa"] == pytest.approx(1 / 7)
    assert inter["realism"]["fleiss_n_images"] == 6
    # choice: P-bar = 4/6, P_e = 5/9 -> 0.25; alpha nominal = 1 - 11*4/(2*4*8) = 0.3125
    assert inter["judged_real"]["fleiss_kappa"] == pytest.approx(0.25)
    assert inter["judged_real"]["krippendorff_alpha_nominal"] == pytest.approx(0.3125)
    assert -1 <= inter["realism"]["krippendorff_alpha_ordinal"] <= 1

    intra = result["intra_reader"]["all"]
    assert intra["n_pairs"] == 2
    assert intra["realism_exact_agreement"] == pytest.approx(0.5)
    assert intra["realism_within_one"] == pytest.approx(1.0)
    assert intra["realism_mean_abs_diff"] == pytest.approx(0.5)
    assert intra["choice_agreement"] == pytest.approx(1.0)

    pairs = {(p["group_a"], p["group_b"]): p for p in result["pairwise"]}
    assert set(pairs) == {("real", "A"), ("real", "B"), ("A", "B")}
    # every real rating beats every B rating: U = 4*4 = 16
    assert pairs[("real", "B")]["u"] == pytest.approx(16.0)
    assert pairs[("real", "B")]["effect_auc"] == pytest.approx(1.0)
    raw = [p["p"] for p in result["pairwise"]]
    assert [p["p_holm"] for p in result["pairwise"]] == pytest.approx(holm(raw))
    assert result["reader_by_group"]["r1"]["real"] == pytest.approx(4.5)


def test_outputs_are_written(tmp_path):
    rows = _rows()
    result = analyze(rows, n_boot=200)
    written = write_outputs(result, rows, tmp_path)
    names = {p.name for p in written}
    assert {"analysis.json", "groups.csv", "readers.csv", "pairwise.csv", "realism_by_model.png",
            "reader_model_heatmap.png"} <= names
    assert (tmp_path / "realism_by_model.png").read_bytes()[:4] == b"\x89PNG"
    header = (tmp_path / "groups.csv").read_text().splitlines()[0]
    assert "realism_ci_low" in header and "judged_real_ci_high" in header
