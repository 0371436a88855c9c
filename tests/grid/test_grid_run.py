"""The grid runner: finished steps are skipped, interrupted runs resume, one failure is isolated."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from grid_fakes import FakeStages

from synthcxr.grid.expand import expand_grid, load_grid
from synthcxr.grid.run import AccelerateTrain, Stages, run_grid

BASE = {"model": {"path": "models/tiny"}, "data": {"path": "data/x", "resolution": 64},
        "method": {"name": "lora"}, "optimizer": {"name": "adamw", "lr": 1e-4}, "train": {"max_steps": 5}}


def make_plan(tmp_path: Path, **extra):
    import yaml

    grid = {"name": "t", "base": BASE, "axes": {"method": ["dreambooth", "lora"], "optimizer": ["adamw", "prodigy"]},
            "generate": {"prompt": "a sks chest x-ray", "n": 3, "seed": 7}, "evaluate": {"real": "data/x"}, **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return expand_grid(load_grid(path), grid_file=path)


def as_stages(fake: FakeStages, study: bool = False) -> Stages:
    return Stages(train=fake.train, generate=fake.generate, evaluate=fake.evaluate, study=fake.study if study else None)


def test_runs_every_step_then_skips_everything_on_rerun(tmp_path):
    plan = make_plan(tmp_path, baseline=True)
    fake = FakeStages(tmp_path / "calls.jsonl")
    out = tmp_path / "out"
    result = run_grid(plan, out, stages=as_stages(fake))
    assert result.ok, result.describe()
    assert len(fake.calls("train")) == 4  # the baseline is not trained
    assert len(fake.calls("generate")) == 5 and len(fake.calls("evaluate")) == 5
    assert {c["model"] for c in fake.calls("generate")} >= {"models/tiny", str(out / "runs" / "lora-adamw" / "train")}
    for name in ["baseline", "dreambooth-adamw", "lora-prodigy"]:
        run = out / "runs" / name
        assert (run / "eval.json").is_file() and (run / "images" / "manifest.jsonl").is_file()
        assert json.loads((run / "run.json").read_text())["status"] == "done"
    status = json.loads((out / "status.json").read_text())
    assert list(status["runs"]) == [r.name for r in plan.runs]

    again = run_grid(plan, out, stages=as_stages(fake))
    assert again.ok
    assert len(fake.calls()) == 14  # nothing ran a second time
    assert all(r.steps["generate"] == "skipped" and r.steps["evaluate"] == "skipped" for r in again.results)

    # summary table: one row per run with metrics, CIs, losses and training figures
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["run"] for r in rows] == [r.name for r in plan.runs]
    lora = next(r for r in rows if r["run"] == "lora-adamw")
    assert float(lora["fid_low"]) < float(lora["fid"]) < float(lora["fid_high"])
    assert lora["method"] == "lora" and lora["optimizer"] == "adamw"
    assert float(lora["val_loss"]) == pytest.approx(0.5 / 20 + 0.1)
    assert lora["trainable_params"] == "12345" and lora["images_per_s"] == "3.2" and lora["peak_memory_mb"] == "512.0"
    md = (out / "summary.md").read_text()
    assert "| lora-adamw | done | lora | adamw |" in md and "[" in md


def test_missing_outputs_are_redone_step_by_step(tmp_path):
    plan = make_plan(tmp_path)
    fake = FakeStages(tmp_path / "calls.jsonl")
    out = tmp_path / "out"
    run_grid(plan, out, stages=as_stages(fake))
    (out / "runs" / "lora-adamw" / "eval.json").unlink()  # e.g. evaluation settings changed
    (out / "runs" / "dreambooth-prodigy" / "images" / "00001.png").unlink()  # an image went missing
    result = run_grid(plan, out, stages=as_stages(fake))
    steps = {r.name: r.steps for r in result.results}
    assert steps["lora-adamw"] == {"train": "skipped", "generate": "skipped", "evaluate": "ran"}
    assert steps["dreambooth-prodigy"]["generate"] == "ran"
    assert len(fake.calls("train")) == 4


def test_interrupted_training_resumes(tmp_path):
    plan = make_plan(tmp_path)
    fake = FakeStages(tmp_path / "calls.jsonl", crash_once={"lora-prodigy"})
    out = tmp_path / "out"
    first = run_grid(plan, out, stages=as_stages(fake))
    assert [r.name for r in first.failed] == ["lora-prodigy"]
    second = run_grid(plan, out, stages=as_stages(fake))
    assert second.ok
    trains = [c for c in fake.calls("train") if c["run"] == "lora-prodigy"]
    assert [c["resume"] for c in trains] == [False, True]
    assert not (out / "runs" / "lora-prodigy" / "error.txt").exists()  # stale error cleared after success


def test_one_failing_run_is_isolated_and_reported(tmp_path):
    plan = make_plan(tmp_path)
    fake = FakeStages(tmp_path / "calls.jsonl", fail={"dreambooth-prodigy"})
    out = tmp_path / "out"
    result = run_grid(plan, out, stages=as_stages(fake))
    assert not result.ok
    assert [r.name for r in result.failed] == ["dreambooth-prodigy"]
    done = [r.name for r in result.results if r.status == "done"]
    assert done == ["dreambooth-adamw", "lora-adamw", "lora-prodigy"]  # the runs after it still ran
    run = out / "runs" / "dreambooth-prodigy"
    assert "simulated training failure" in (run / "error.txt").read_text()
    assert "RuntimeError" in (run / "traceback.txt").read_text()
    assert "simulated training failure" in (run / "run.log").read_text()
    text = result.describe()
    assert "FAILED dreambooth-prodigy" in text and str(run / "run.log") in text
    rows = {r["run"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["dreambooth-prodigy"]["status"] == "failed" and "simulated" in rows["dreambooth-prodigy"]["error"]


def test_changed_config_is_not_silently_reused(tmp_path):
    fake = FakeStages(tmp_path / "calls.jsonl")
    out = tmp_path / "out"
    run_grid(make_plan(tmp_path), out, stages=as_stages(fake), only=["lora-adamw"])
    changed = make_plan(tmp_path, set={"train.max_steps": 9})
    for _ in range(2):  # refused every time, not just the first
        result = run_grid(changed, out, stages=as_stages(fake), only=["lora-adamw"])
        assert not result.ok
        assert "different config" in result.failed[0].error
    assert len(fake.calls("train")) == 1
    assert run_grid(make_plan(tmp_path), out, stages=as_stages(fake), only=["lora-adamw"]).ok  # the original still resumes


def test_study_across_runs_and_only(tmp_path):
    plan = make_plan(tmp_path, study={"per_model": 2, "real_count": 2, "readers": 2, "simulate": True}, baseline=True)
    fake = FakeStages(tmp_path / "calls.jsonl")
    out = tmp_path / "out"
    result = run_grid(plan, out, stages=as_stages(fake, study=True))
    assert result.ok
    calls = fake.calls("study")
    assert len(calls) == 1 and calls[0]["models"] == sorted(r.name for r in plan.runs)
    assert (out / "study" / "analysis.json").is_file()
    rows = {r["run"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert float(rows["baseline"]["study.realism"]) == pytest.approx(2.5)
    assert rows["baseline"]["study.realism_low"] == "2.0"
    run_grid(plan, out, stages=as_stages(fake, study=True))
    assert len(fake.calls("study")) == 1  # analysed once, reused after


def test_accelerate_launcher_builds_the_launch_command(tmp_path):
    launcher = AccelerateTrain(["--num_processes", "2"], accelerate="/opt/bin/accelerate")
    cmd = launcher.command(tmp_path / "cfg.yaml", tmp_path / "train", resume=True)
    assert cmd == ["/opt/bin/accelerate", "launch", "--num_processes", "2", "-m", "synthcxr", "train",
                   str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "train"), "--resume"]


def test_accelerate_launcher_failure_is_recorded(tmp_path, monkeypatch):
    """A failing `accelerate launch` subprocess fails only its run, with the subprocess output in the error."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_accelerate = bin_dir / "accelerate"
    fake_accelerate.write_text("#!/bin/sh\necho 'launch args:' \"$@\"\necho 'CUDA out of memory' >&2\nexit 3\n")
    fake_accelerate.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    plan = make_plan(tmp_path, launcher={"accelerate_args": ["--num_processes", "2"]})
    fake = FakeStages(tmp_path / "calls.jsonl")
    result = run_grid(plan, tmp_path / "out", launcher="accelerate", stages=as_stages(fake), only=["lora-adamw"])
    assert not result.ok
    error = result.failed[0].error
    assert "exited with code 3" in error and "CUDA out of memory" in error
    cfg = tmp_path / "out" / "runs" / "lora-adamw" / "train_config.yaml"
    assert cfg.is_file()
    assert "launch args: launch --num_processes 2 -m synthcxr train" in (cfg.parent / "accelerate.log").read_text()
    assert fake.calls("train") == []  # training went through the subprocess, not in-process


def test_a_signal_stops_the_whole_grid_and_the_rerun_resumes(tmp_path, caplog):
    plan = make_plan(tmp_path)
    fake = FakeStages(tmp_path / "calls.jsonl", interrupt_once={"dreambooth-prodigy"})
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        first = run_grid(plan, out, stages=as_stages(fake))
    assert first.interrupted and not first.ok
    # a stop the user (or the cluster) asked for is logged as a stop, not as an error
    said = [r for r in caplog.records if "SIGTERM" in r.getMessage()]
    assert said and all(r.levelno < logging.ERROR and "failed" not in r.getMessage() for r in said)
    assert [r.name for r in first.results] == ["dreambooth-adamw", "dreambooth-prodigy"]  # the rest never started
    assert "run the same command again to resume" in first.describe()
    second = run_grid(plan, out, stages=as_stages(fake))
    assert second.ok
    trains = [(c["run"], c["resume"]) for c in fake.calls("train")]
    assert trains.count(("dreambooth-prodigy", True)) == 1 and ("lora-prodigy", False) in trains


def test_changed_shared_settings(tmp_path):
    """New evaluate settings re-evaluate (old results kept); new generate settings are refused."""
    fake = FakeStages(tmp_path / "calls.jsonl")
    out = tmp_path / "out"
    assert run_grid(make_plan(tmp_path), out, stages=as_stages(fake), only=["lora-adamw"]).ok
    run = out / "runs" / "lora-adamw"
    old = (run / "eval.json").read_text()
    changed_eval = make_plan(tmp_path, evaluate={"real": "data/x", "seed": 3})
    result = run_grid(changed_eval, out, stages=as_stages(fake), only=["lora-adamw"])
    assert result.ok and result.results[0].steps == {"train": "skipped", "generate": "skipped", "evaluate": "ran"}
    kept = [p for p in run.glob("eval.*.json")]
    assert len(kept) == 1 and kept[0].read_text() == old
    changed_gen = make_plan(tmp_path, evaluate={"real": "data/x", "seed": 3},
                            generate={"prompt": "a sks chest x-ray", "n": 3, "seed": 8})
    result = run_grid(changed_gen, out, stages=as_stages(fake), only=["lora-adamw"])
    assert not result.ok and "generate settings changed" in result.failed[0].error
    assert len(fake.calls("generate")) == 1
