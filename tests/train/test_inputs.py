"""Training inputs are checked before anything is written; a start that stopped before training leaves a
run directory the corrected command may reuse; images/s counts training only; Ctrl-C is a stop, not an error."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from synthcxr.errors import ConfigError, SynthCXRError
from synthcxr.fileio import read_jsonl


@pytest.mark.parametrize("bad", ["missing model folder", "empty data folder", "offline hub id"])
def test_bad_model_or_data_fails_before_anything_is_written(make_config, tmp_path, bad):
    from synthcxr.train.loop import train

    empty = tmp_path / "empty"
    empty.mkdir()
    sections = {"missing model folder": {"model": {"path": str(tmp_path / "no-such-model")}},
                "empty data folder": {"data": {"path": str(empty)}},
                "offline hub id": {"model": {"path": "someone/a-model-not-in-the-cache"}}}[bad]
    run = tmp_path / "run"
    with pytest.raises(SynthCXRError) as err:
        train(make_config(**sections), run)
    assert "Fix:" in str(err.value)
    assert not run.exists()  # no config.yaml, splits.json or run directory for the corrected command to trip on


def test_unknown_optimizer_option_fails_in_the_cli_before_anything_is_written(tiny_model_dir, train_data, tmp_path,
                                                                               capsys):
    from synthcxr.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir)}, "data": {"path": str(train_data)}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "--set", "optimizer.options.d_coef=2", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "optimizer.options" in err and "'d_coef'" in err and "it takes:" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("train_section", "words"), [
    ({"batch_size": 9}, "one optimizer step takes 9 images"),
    ({"batch_size": 4, "gradient_accumulation": 3}, "one optimizer step takes 12 images"),
])
def test_a_step_larger_than_the_training_set_is_refused(make_config, tmp_path, train_section, words):
    from synthcxr.train.loop import train

    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train(make_config(train=train_section), run)
    msg = " ".join(str(err.value).split())
    assert words in msg and "training split has 8" in msg and "at most 8" in msg and "train.repeats" in msg
    assert not run.exists()


def test_a_step_larger_than_the_training_set_only_warns_when_repeats_are_asked_for(make_config, tmp_path, caplog):
    from synthcxr.train.loop import train

    with caplog.at_level(logging.WARNING, logger="synthcxr"):
        run = train(make_config(train={"batch_size": 10, "repeats": 2, "max_steps": 1}), tmp_path / "run")
    assert (run / "DONE").exists()
    assert any("training split has 8" in r.getMessage() and "repeats" in r.getMessage() for r in caplog.records)


def test_a_run_that_already_trains_with_repeats_in_a_step_still_resumes(make_config, tmp_path, monkeypatch, caplog):
    """Its config may not change on --resume, so refusing it would strand the run: warn instead."""
    from synthcxr.train import loop

    real = loop._read_data
    monkeypatch.setattr(loop, "_read_data", lambda cfg, processes, resuming: real(cfg, processes, True))
    run = loop.train(make_config(train={"batch_size": 10, "max_steps": 1}), tmp_path / "run")  # as made before
    monkeypatch.setattr(loop, "_read_data", real)
    (run / "DONE").unlink()
    with pytest.raises(ConfigError, match="training split has 8"):  # a new run is refused
        loop.train(make_config(train={"batch_size": 10, "max_steps": 2}), tmp_path / "new")
    with caplog.at_level(logging.WARNING, logger="synthcxr"):
        loop.train(make_config(train={"batch_size": 10, "max_steps": 2}), run, resume=True)
    assert (run / "DONE").read_text() == "finished step 2\n"
    assert any("resuming a run" in r.getMessage() for r in caplog.records)


def _stop_during_setup(monkeypatch):
    """A start that stops after the run directory was written but before any step (e.g. Ctrl-C while caching)."""
    from synthcxr.train import methods

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(methods, "apply_method", stop)


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_directory_without_training_work_is_reused_by_the_corrected_command(make_config, tmp_path, monkeypatch,
                                                                                 resume):
    from synthcxr.train.loop import train

    run = tmp_path / "run"
    real = __import__("synthcxr.train.methods", fromlist=["apply_method"]).apply_method
    _stop_during_setup(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(data={"split": {"val": 0.25}}), run)
    assert (run / "config.yaml").is_file() and (run / "splits.json").is_file()
    monkeypatch.setattr("synthcxr.train.methods.apply_method", real)
    # another split and learning rate: no "already exists" refusal, and --resume takes the new config
    corrected = make_config(optimizer={"lr": 2e-3}, train={"max_steps": 2})
    assert train(corrected, run, resume=resume) == run
    assert (run / "DONE").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 2e-3 and saved["data"]["split"]["val"] == 0.0
    assert json.loads((run / "splits.json").read_text())["counts"]["train"] == 8


def test_a_run_directory_with_finished_steps_is_still_protected(make_config, tmp_path):
    from synthcxr.train.loop import train

    run = train(make_config(train={"max_steps": 1}), tmp_path / "run")
    (run / "DONE").unlink()
    for path in (run / "checkpoints").iterdir():  # no checkpoint, but metrics.jsonl records a finished step
        import shutil

        shutil.rmtree(path)
    with pytest.raises(ConfigError, match="finished steps"):
        train(make_config(train={"max_steps": 1}), run)
    with pytest.raises(ConfigError, match="different config"):
        train(make_config(train={"max_steps": 1}, optimizer={"lr": 5e-3}), run, resume=True)


def test_images_per_second_excludes_validation_and_checkpoints(make_config, tmp_path, monkeypatch):
    from synthcxr.train import loop

    pause = 0.6
    step_times: list[float] = []
    real_step, real_save, real_validate = loop.Session.train_step, loop.Session.save, loop.Session.validate

    def timed_step(self, batches):
        began = time.perf_counter()
        try:
            return real_step(self, batches)
        finally:
            step_times.append(time.perf_counter() - began)

    def slow_save(self, step):
        time.sleep(pause)
        return real_save(self, step)

    def slow_validate(self, step):
        time.sleep(pause)
        return real_validate(self, step)

    monkeypatch.setattr(loop.Session, "train_step", timed_step)
    monkeypatch.setattr(loop.Session, "save", slow_save)
    monkeypatch.setattr(loop.Session, "validate", slow_validate)
    run = loop.train(make_config(train={"max_steps": 3, "checkpoint_every": 1, "validate_every": 1}), tmp_path / "r")
    summary = json.loads((run / "summary.json").read_text())
    # 3 checkpoints and 3 validations (steps 1, 2 in the loop; the final one) of >= `pause` s each
    assert summary["checkpoint_time_s"] >= 3 * pause and summary["validation_time_s"] >= 3 * pause
    assert sum(step_times) <= summary["train_time_s"] < sum(step_times) + pause  # the pauses are not in it
    images = summary["steps"] * summary["global_batch"]
    assert summary["images_per_s"] == pytest.approx(images / summary["train_time_s"])
    for row in (r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "train"):
        assert row["images_per_s"] > summary["global_batch"] / (max(step_times) + pause)


def test_ctrl_c_is_reported_as_a_stop_not_an_error(tiny_model_dir, train_data, tmp_path, monkeypatch, capsys):
    from synthcxr.cli import main
    from synthcxr.train import loop

    real_loss = loop.Session.loss

    def loss_then_ctrl_c(self, item):
        if item["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(self, item)

    monkeypatch.setattr(loop.Session, "loss", loss_then_ctrl_c)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir)},
                                      "data": {"path": str(train_data), "resolution": 32,
                                               "split": {"val": 0.0, "test": 0.0}},
                                      "train": {"max_steps": 4, "batch_size": 2, "validation_seeds": []}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "stopped: SIGINT received at step 2 of 4" in err and "--resume" in err
    assert "error" not in err.lower()
    assert Path(tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()


def test_a_second_start_on_a_run_directory_in_use_stops_at_once(make_config, tmp_path):
    """Reusing a run directory without training work must not let two trainings share it."""
    from synthcxr.generate.lock import OutputBusyError, output_lock
    from synthcxr.train.loop import train

    run = tmp_path / "run"
    with output_lock(run):  # as a running `synthcxr train` holds it
        for resume in (False, True):
            with pytest.raises(OutputBusyError, match="another `synthcxr train` is using this run directory"):
                train(make_config(), run, resume=resume)
    assert not run.exists()


def test_resume_of_a_run_saved_before_families_accepts_explicit_default_targets(make_config, tmp_path):
    """A config.yaml written before the family layer names the LoRA targets explicitly; today's default is
    None (the family's targets). The same targets are the same config, so --resume is not refused."""
    from synthcxr.config import save_config
    from synthcxr.models.families import get_family
    from synthcxr.train.loop import _check_run_dir

    cfg = make_config()
    assert cfg.method.target_modules is None
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    old = cfg.model_copy(update={"method": cfg.method.model_copy(
        update={"target_modules": list(get_family("sd").lora_targets)})})
    save_config(old, run / "config.yaml")
    assert _check_run_dir(cfg, run, resume=True, family=get_family("sd")) == "resume"
    other = cfg.model_copy(update={"method": cfg.method.model_copy(update={"target_modules": ["to_q"]})})
    save_config(other, run / "config.yaml")
    with pytest.raises(ConfigError, match="different config.*target_modules"):
        _check_run_dir(cfg, run, resume=True, family=get_family("sd"))
