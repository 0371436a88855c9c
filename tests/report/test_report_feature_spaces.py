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


def _eval(fid: float, *, main: str = "inception", main_pretrained: bool = True) -> dict:
    return {"extractor": {"name": main, "pretrained": main_pretrained}, "extractor_pretrained": main_pretrained,
            "fidelity": _table(fid),
            "fidelity_by_extractor": [{"extractor": {"name": "dinov2:vits14", "pretrained": False},
                                       "extractor_pretrained": False, **_table(fid * 10)}],
            "cmmd": {"extractor": {"name": "clip", "pretrained": True}, "extractor_pretrained": True,
                     "value": fid / 100, "ci": [0.0, 1.0]}}


def _report_data(evals: dict[str, dict]):
    from pathlib import Path

    from synthcxr.report.collect import ReportData, RunData

    return ReportData(root=Path("."), title="t", runs=[RunData(name=name, root=Path(name), eval=ev) for name, ev in evals.items()])


def test_one_fidelity_table_per_extractor_naming_it_and_marking_random_weights():
    from synthcxr.report.build import build_context, render

    context = build_context(_report_data({"run-a": _eval(30.0), "run-b": _eval(20.0)}))
    tables = {t["extractor"]: t for t in context["fidelity_tables"]}
    assert list(tables) == ["inception", "dinov2:vits14", "clip"]
    inception, dino, clip = tables["inception"], tables["dinov2:vits14"], tables["clip"]
    assert inception["columns"] == ["fid", "kid", "precision", "recall", "density", "coverage"]
    assert [r["run"] for r in inception["rows"]] == ["run-a", "run-b"]
    assert inception["rows"][1]["cells"][0] == ("20 [19, 21]", True)  # the lower FID is marked best
    assert dino["rows"][0]["cells"][0][0].startswith("300 ") and dino["not_comparable"]
    assert not inception["not_comparable"] and clip["columns"] == ["cmmd"]
    assert clip["rows"][1]["cells"][0][1] is True  # lower CMMD is better
    # numbers of different feature spaces no longer share the summary table
    assert "fid" in context["columns"] and not any("[" in c for c in context["columns"])
    assert "fid[dinov2:vits14]" in [name for name, _, _ in context["metric_figs"]]  # its plot names the extractor
    html = render(context)
    assert "Fidelity in inception features" in html and "Fidelity in dinov2:vits14 features" in html
    assert html.count("random weights: not comparable") == 1


def test_runs_with_different_main_extractors_get_separate_tables():
    from synthcxr.report.build import build_context

    context = build_context(_report_data({"a": _eval(30.0), "b": _eval(5.0, main="random", main_pretrained=False),
                                          "c": {"fidelity": _table(9.0)}}))
    tables = {(t["extractor"], t["not_comparable"]): [r["run"] for r in t["rows"]] for t in context["fidelity_tables"]}
    assert tables[("inception", False)] == ["a"] and tables[("random", True)] == ["b"]
    assert tables[(None, False)] == ["c"]  # an evaluation that does not name its extractor is shown apart
