"""`synthcxr study ...` end to end through the real CLI entry point."""

from __future__ import annotations

import json
import re

import pytest
from study_helpers import run_cli

from synthcxr.cli import main


def test_create_status_simulate_export_analyze(tmp_path, sources, capsys, monkeypatch):
    monkeypatch.delenv("SYNTHCXR_STUDY_SECRET", raising=False)
    db = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    out = run_cli(["study", "create", "--name", "cli-study", "--real", str(sources["real"]),
                "--model", str(sources["model_b"]), "--model", f"a={tmp_path / 'runs' / 'model_a'}",
                "--per-model", "3", "--real-count", "3", "--readers", "2", "--repeats", "1",
                "--image-size", "32", "--finding", "--dir", str(tmp_path / "sd"), "--db", db,
                "--base-url", "http://study.local:9000"], capsys)
    links = re.findall(r"reader-\d: (http://study\.local:9000/invite/\S+)", out)
    assert len(links) == 2 and "Admin token" in out
    assert "9 images (a 3, model_b 3, real 3), 10 per reader" in out

    status = json.loads(run_cli(["study", "status", "cli-study", "--json", "--db", db], capsys))
    assert [r["answered"] for r in status[0]["readers"]] == [0, 0]
    assert "20 simulated answers added" in run_cli(["study", "simulate", "cli-study", "--db", db], capsys)
    run_cli(["study", "export", "cli-study", "--out", str(tmp_path / "r.csv"), "--db", db], capsys)
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 21
    out = run_cli(["study", "analyze", "cli-study", "--out", str(tmp_path / "an"), "--n-boot", "100", "--db", db], capsys)
    assert "realism" in out and (tmp_path / "an" / "realism_by_model.png").is_file()
    link = run_cli(["study", "add-reader", "cli-study", "--reader-name", "dr-z", "--db", db], capsys)
    assert "/invite/" in link


def test_unknown_study_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["study", "export", "nope", "--out", str(tmp_path / "x.csv"), "--db", f"sqlite:///{tmp_path / 'e.db'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no study called 'nope'" in err and "Traceback" not in err


def test_bad_settings_are_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SYNTHCXR_STUDY_SECRET", "short")
    with pytest.raises(SystemExit):
        main(["study", "status", "--db", f"sqlite:///{tmp_path / 'e.db'}"])
    assert "at least 32 characters" in capsys.readouterr().err


def test_database_comes_from_the_environment(tmp_path, sources, capsys, monkeypatch):
    monkeypatch.setenv("SYNTHCXR_STUDY_DB", f"sqlite:///{tmp_path / 'env.sqlite3'}")
    monkeypatch.setenv("SYNTHCXR_STUDY_DIR", str(tmp_path / "envdir"))
    monkeypatch.setenv("SYNTHCXR_STUDY_SECRET", "s" * 40)
    run_cli(["study", "create", "--name", "env-study", "--model", str(sources["model_b"]), "--per-model", "2",
          "--readers", "1", "--image-size", "32"], capsys)
    assert (tmp_path / "env.sqlite3").is_file() and any((tmp_path / "envdir" / "images" / "env-study").iterdir())
    assert "env-study: 2 images" in run_cli(["study", "status"], capsys)
    monkeypatch.setenv("SYNTHCXR_STUDY_DB", "mysql://x@y/z")
    with pytest.raises(SystemExit):
        main(["study", "status"])
    assert "unsupported database" in capsys.readouterr().err


def test_paired_calibration_mrmc_export_and_delta(tmp_path, sources, capsys, monkeypatch):
    monkeypatch.delenv("SYNTHCXR_STUDY_SECRET", raising=False)
    db = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    out = run_cli(["study", "create", "--name", "p", "--real", str(sources["real"]), "--model", str(sources["model_b"]),
                   "--per-model", "3", "--real-count", "3", "--readers", "2", "--design", "paired",
                   "--calibration", "1", "--counterbalance", "--image-size", "32", "--dir", str(tmp_path / "sd"),
                   "--db", db], capsys)
    assert "4 pairs per reader (1 for calibration)" in out
    run_cli(["study", "simulate", "p", "--db", db], capsys)
    run_cli(["study", "export", "p", "--mrmc", "--out", str(tmp_path / "m.csv"), "--db", db], capsys)
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "reader,case,modality,truth,rating" and len(lines) == 1 + 2 * 3
    out = run_cli(["study", "analyze", "p", "--out", str(tmp_path / "an"), "--n-boot", "50", "--delta", "0.1",
                   "--db", db], capsys)
    assert "MRMC AUC" in out and "within 0.5 +- 0.1" in out and (tmp_path / "an" / "mrmc.csv").is_file()
    with pytest.raises(SystemExit):
        main(["study", "analyze", "p", "--out", str(tmp_path / "an2"), "--delta", "0.7", "--db", db])
    assert "--delta 0.7 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "create", "--name", "q", "--model", str(sources["model_b"]), "--design", "pair",
              "--db", db, "--dir", str(tmp_path / "sd")])
    assert "did you mean 'paired'" in capsys.readouterr().err


def test_analyze_prints_degenerate_mrmc_rows():
    """Identical readers give zero variance: the JSON holds None for df, CI and TOST p, and the
    summary line must still print (it raised TypeError on a random study secret in CI)."""
    from synthcxr.study.commands import _mrmc_line

    line = _mrmc_line({"model": "a", "auc": 1.0, "ci": [None, None], "df": None, "tost_p": None,
                       "equivalent": False}, 0.05)
    assert "MRMC AUC 1.000 [n/a, n/a] (df n/a)" in line and "TOST p = n/a" in line
    line = _mrmc_line({"model": "a", "auc": 0.52, "ci": [0.4, 0.64], "df": float("inf"), "tost_p": 0.01,
                       "equivalent": True}, 0.05)
    assert "(df inf), indistinguishable (TOST p = 0.010)" in line
