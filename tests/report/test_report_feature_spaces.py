"""The report carries every feature space's fidelity numbers, CMMD and re-ID, each named by its extractor."""

from __future__ import annotations

from synthcxr.report.collect import extract_metrics


def _table(fid: float) -> dict:
    return {"fid": {"value": fid, "ci": [fid - 1, fid + 1]}, "kid": {"mean": 0.01, "ci": [0.0, 0.02]},
            "precision": {"value": 0.7, "ci": None}, "recall": {"value": 0.6, "ci": None},
            "density": {"value": 0.9, "ci": None}, "coverage": {"value": 0.8, "ci": None}}


def test_one_set_of_fidelity_columns_per_extractor_plus_cmmd_and_reid():
    data = {"extractor": {"name": "inception"}, "fidelity": _table(30.0),
            "fidelity_by_extractor": [{"extractor": {"name": "dinov2"}, **_table(400.0)},
                                      {"extractor": {"name": "raddino"}, **_table(12.0)}],
            "cmmd": {"extractor": {"name": "clip"}, "value": 0.42, "ci": [0.3, 0.5]},
            "reid": {"score": {"mean": 0.3, "max": 0.9}, "fraction_above": 0.05, "n_above": 1}}
    metrics = {m.name: m for m in extract_metrics(data)}
    assert metrics["fid"].value == 30.0
    assert metrics["fid[dinov2]"].value == 400.0 and metrics["fid[dinov2]"].low == 399.0
    assert metrics["fid[raddino]"].value == 12.0 and metrics["kid[raddino]"].value == 0.01
    assert metrics["cmmd[clip]"].value == 0.42 and metrics["cmmd[clip]"].high == 0.5
    assert metrics["reid.mean"].value == 0.3 and metrics["reid.fraction_above"].value == 0.05


def test_a_reid_only_result_is_read_as_synthcxr_output():
    metrics = {m.name for m in extract_metrics({"reid": {"score": {"mean": 0.2, "max": 0.5}, "fraction_above": 0.0}})}
    assert metrics == {"reid.mean", "reid.max", "reid.fraction_above"}
