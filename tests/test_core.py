"""Core behaviour every stage relies on: CLI root, config loading/overrides, atomic files, run dirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from synthcxr import __version__
from synthcxr.config import StrictModel, apply_overrides, load_config, save_config
from synthcxr.errors import ConfigError, Problem, ProblemsError
from synthcxr.fileio import append_jsonl, atomic_write_json, read_jsonl, sha256_file
from synthcxr.rundir import RunDir, environment_info


class _Optimizer(StrictModel):
    name: str = "adamw"
    lr: float = Field(1e-4, gt=0)


class _Config(StrictModel):
    optimizer: _Optimizer = _Optimizer()
    steps: int = 10


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthcxr", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help_list_every_stage():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"synthcxr {__version__}"
    help_text = run_cli("--help").stdout
    for stage in ("data", "model", "train", "generate", "evaluate", "study", "grid", "report", "demo"):
        assert stage in help_text


def test_user_error_prints_message_without_traceback(tmp_path):
    target = tmp_path / "not-empty"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    out = run_cli("model", "make-tiny", str(target))
    assert out.returncode == 2
    assert "not empty" in out.stderr and "Traceback" not in out.stderr
    assert (target / "keep.txt").read_text() == "user data"
    debug = run_cli("--debug", "model", "make-tiny", str(target))
    assert "Traceback" in debug.stderr


def test_config_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  name: prodigy\nsteps: 5\n")
    cfg = load_config(_Config, path, ["optimizer.lr=1.0", "steps=7"])
    assert cfg.optimizer.name == "prodigy" and cfg.optimizer.lr == 1.0 and cfg.steps == 7
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(_Config, saved) == cfg


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  nmae: adam\n")
    with pytest.raises(ConfigError) as err:
        load_config(_Config, path)
    msg = str(err.value)
    assert "optimizer.nmae" in msg and "did you mean 'optimizer.name'" in msg and str(path) in msg


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(_Config, None, ["optimizer.lr=-1"])
    assert "optimizer.lr" in str(err.value) and "-1" in str(err.value)


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(_Config, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(_Config, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="no '='"):
        apply_overrides({}, ["optimizer.lr"])


def test_problems_error_lists_every_problem():
    err = ProblemsError([Problem("a.png", "truncated", "re-export it"), Problem("b.txt", "unparseable", "fix line 1")])
    text = str(err)
    assert "2 problem(s)" in text and "a.png" in text and "b.txt" in text and "on_error" in text


def test_jsonl_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"a": 2})
    with open(path, "a") as fh:
        fh.write('{"a": 3')  # a crash mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_atomic_json_and_hash(tmp_path):
    path = atomic_write_json(tmp_path / "x" / "r.json", {"fid": 1.5})
    assert json.loads(path.read_text()) == {"fid": 1.5}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    assert len(sha256_file(path)) == 64


def test_run_dir_layout_keeps_existing_files(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    run = RunDir.create(root)
    assert run.checkpoints.is_dir() and run.samples.is_dir() and run.logs.is_dir()
    assert (root / "notes.txt").read_text() == "mine"
    info = environment_info()
    assert info["packages"]["torch"] and "device" in info


def test_tiny_model_is_a_loadable_sd_pipeline(tiny_model_dir: Path):
    import torch

    from synthcxr.models.load import load_pipeline

    pipe = load_pipeline(tiny_model_dir)
    assert pipe.tokenizer("a chest x-ray").input_ids[0] == pipe.tokenizer.bos_token_id
    image = pipe("a chest x-ray", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
