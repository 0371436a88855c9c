"""`synthcxr demo` end to end: the whole pipeline on the tiny model, then a resumed re-run."""

from __future__ import annotations

import json
import time

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    from synthcxr.cli import main

    out = tmp_path / "demo"
    started = time.perf_counter()
    main(["demo", "--out", str(out)])
    first = time.perf_counter() - started
    printed = capsys.readouterr().out.strip().splitlines()
    report = out / "grid" / "report.html"
    assert printed[-1] == str(report)  # the report's path is what the command prints
    html = report.read_text()
    for run in ("lora-adamw", "dreambooth-prodigy"):
        assert run in html
        run_dir = out / "grid" / "runs" / run
        assert (run_dir / "train" / "DONE").is_file()
        assert (run_dir / "train" / "synthcxr_model.json").is_file()
        assert len((run_dir / "images" / "manifest.jsonl").read_text().splitlines()) == 8
        results = json.loads((run_dir / "eval.json").read_text())
        assert results["fidelity"]["fid"]["value"] >= 0
    analysis = json.loads((out / "grid" / "study" / "analysis.json").read_text())
    assert {g["group"] for g in analysis["groups"]} == {"real", "lora-adamw", "dreambooth-prodigy"}
    assert 'alt="training loss curves"' in html and 'alt="sample"' in html and "realism" in html
    summary = (out / "grid" / "summary.csv").read_text()
    assert "lora-adamw" in summary and "dreambooth-prodigy" in summary

    # a second run reuses every finished step
    mtime = (out / "grid" / "runs" / "lora-adamw" / "eval.json").stat().st_mtime
    started = time.perf_counter()
    main(["demo", "--out", str(out)])
    second = time.perf_counter() - started
    status = json.loads((out / "grid" / "status.json").read_text())
    for run in status["runs"].values():
        assert run["steps"] == {"train": "skipped", "generate": "skipped", "evaluate": "skipped"}
    assert (out / "grid" / "runs" / "lora-adamw" / "eval.json").stat().st_mtime == mtime
    assert second < first
