"""Grid files expand into the runs a user expects, with readable names and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from synthcxr.errors import ConfigError
from synthcxr.grid.expand import expand_grid, load_grid, load_plan

REPO = Path(__file__).resolve().parents[2]

BASE = {"model": {"path": "models/tiny"}, "data": {"path": "data/x", "resolution": 64},
        "method": {"name": "lora"}, "optimizer": {"name": "adamw", "lr": 1e-4}, "train": {"max_steps": 5}}


def write_grid(tmp_path: Path, grid: dict, base: dict | None = BASE) -> Path:
    grid = {"generate": {"prompt": "a sks chest x-ray"}, **grid}
    if base is not None:
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
        grid = {"base": "base.yaml", **grid}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_axes_expand_to_named_runs_in_order(tmp_path):
    path = write_grid(tmp_path, {"axes": {"method": ["dreambooth", "lora"], "optimizer": ["adamw", "prodigy"]}})
    plan = load_plan(path)
    assert [r.name for r in plan.runs] == ["dreambooth-adamw", "dreambooth-prodigy", "lora-adamw", "lora-prodigy"]
    run = plan.runs[1]
    assert run.train["method"]["name"] == "dreambooth"
    assert run.train["optimizer"]["name"] == "prodigy"
    assert run.train["train"]["max_steps"] == 5  # from the base
    assert run.train["train"]["batch_size"] == 1  # defaults are filled in (resolved config)
    # same file -> same plan (names and fingerprints), which is what makes resuming safe
    again = load_plan(path)
    assert [r.fingerprint() for r in again.runs] == [r.fingerprint() for r in plan.runs]


def test_per_value_override_blocks_and_numeric_axis_names(tmp_path):
    path = write_grid(tmp_path, {
        "set": {"train.max_steps": 7},
        "axes": {
            "optimizer": {"adamw": {"optimizer.lr": 2e-4}, "prodigy": {"optimizer": {"lr": 1.0, "weight_decay": 0.0}}},
            "method.rank": [4, 16],
        },
    })
    plan = load_plan(path)
    names = [r.name for r in plan.runs]
    assert names == ["adamw-rank4", "adamw-rank16", "prodigy-rank4", "prodigy-rank16"]
    by = {r.name: r.train for r in plan.runs}
    assert by["adamw-rank4"]["optimizer"]["lr"] == 2e-4
    assert by["prodigy-rank16"]["optimizer"] == {**by["prodigy-rank16"]["optimizer"], "lr": 1.0, "weight_decay": 0.0}
    assert by["prodigy-rank16"]["method"]["rank"] == 16
    assert all(t["train"]["max_steps"] == 7 for t in by.values())
    assert plan.runs[0].overrides["optimizer.lr"] == 2e-4


def test_include_exclude_and_baseline(tmp_path):
    path = write_grid(tmp_path, {
        "axes": {"method": ["dreambooth", "lora"], "optimizer": ["adamw", "adamw8bit"]},
        "exclude": [{"method": "dreambooth", "optimizer": "adamw8bit"}],
        "include": [{"method": "lora", "optimizer": "adamw", "name": "lora-adamw-r16", "set": {"method.rank": 16}}],
        "baseline": True,
    })
    plan = load_plan(path)
    assert [r.name for r in plan.runs] == ["baseline", "dreambooth-adamw", "lora-adamw", "lora-adamw8bit", "lora-adamw-r16"]
    baseline = plan.runs[0]
    assert baseline.is_baseline and baseline.train is None and baseline.model == "models/tiny"
    assert plan.runs[-1].train["method"]["rank"] == 16
    assert plan.select(["lora-adamw"])[0].name == "lora-adamw"


@pytest.mark.parametrize(
    ("axes", "needle"),
    [
        ({"optimiser": ["adamw"]}, "did you mean 'optimizer'"),
        ({"optimizer.lrr": [1e-4]}, "did you mean 'optimizer.lr'"),
        ({"train.max_stepz": [5]}, "did you mean 'train.max_steps'"),
    ],
)
def test_bad_axis_key_is_a_clear_error(tmp_path, axes, needle):
    path = write_grid(tmp_path, {"axes": axes})
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    message = info.value.render()
    assert needle in message
    assert str(path) in message


def test_bad_axis_value_names_the_run(tmp_path):
    path = write_grid(tmp_path, {"axes": {"optimizer": ["adamw", "adamw9bit"]}})
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    assert "adamw9bit" in info.value.render() and "did you mean 'adamw8bit'" in info.value.render()


def test_unknown_grid_key_and_duplicate_names_and_bad_only(tmp_path):
    path = write_grid(tmp_path, {"axis": {"method": ["lora"]}})
    with pytest.raises(ConfigError, match="did you mean 'axes'"):
        load_grid(path)
    path = write_grid(tmp_path, {"axes": {"method": ["lora"]}, "include": [{"method": "lora"}]})
    with pytest.raises(ConfigError, match="several runs are named 'lora'"):
        load_plan(path)
    plan = load_plan(write_grid(tmp_path, {"axes": {"method": ["lora", "dreambooth"]}}))
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        plan.select(["lroa"])


def test_inline_base_without_schema(tmp_path):
    grid = load_grid(write_grid(tmp_path, {"base": dict(BASE), "axes": {"lr": [1e-4, 5e-5]}}, base=None))
    plan = expand_grid(grid, schema=None)
    assert [r.name for r in plan.runs] == ["lr0.0001", "lr5e-05"]
    assert plan.runs[1].train["optimizer"]["lr"] == 5e-5


def test_study_grid_config_reproduces_the_study_matrix():
    plan = load_plan(REPO / "configs" / "study_grid.yaml")
    names = [r.name for r in plan.runs]
    methods, optimizers = ["dreambooth", "lora"], ["adamw", "adamw8bit", "adafactor", "dadaptation", "prodigy"]
    assert names == ["baseline", *[f"{m}-{o}" for m in methods for o in optimizers]]
    for run in plan.runs[1:]:
        paths = [str(p) for p in run.train["data"]["path"]]
        assert paths == ["data/MontgomerySet", "data/ChinaSet_AllFiles"]
    assert plan.generate and plan.evaluate


def test_cli_dry_run_lists_runs_and_bad_file_is_one_clear_line(tmp_path, capsys):
    from synthcxr.cli import main

    path = write_grid(tmp_path, {"axes": {"method": ["dreambooth", "lora"]}, "baseline": True})
    main(["grid", str(path), "--out", str(tmp_path / "out"), "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["baseline: baseline (no training)", "dreambooth: method=dreambooth", "lora: method=lora"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    bad = write_grid(tmp_path, {"axes": {"optimiser": ["adamw"]}})
    with pytest.raises(SystemExit) as info:
        main(["grid", str(bad), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean 'optimizer'" in err and "Traceback" not in err


def test_real_images_default_to_the_training_data(tmp_path):
    both = dict(BASE, data={"path": ["data/MontgomerySet", "data/ChinaSet_AllFiles"], "resolution": 64})
    plan = load_plan(write_grid(tmp_path, {"axes": {"method": ["lora"]}}, base=both))
    assert plan.evaluate["real"] == "data"  # the folder holding both sets
    apart = dict(BASE, data={"path": ["/a/MontgomerySet", "/b/ChinaSet_AllFiles"], "resolution": 64})
    with pytest.raises(ConfigError, match="set evaluate.real"):
        load_plan(write_grid(tmp_path, {"axes": {"method": ["lora"]}}, base=apart))
    plan = load_plan(write_grid(tmp_path, {"axes": {"method": ["lora"]}, "evaluate": {"real": "/r"}}, base=apart))
    assert plan.evaluate["real"] == "/r"


def test_generate_and_evaluate_settings_are_checked_before_any_run(tmp_path):
    path = write_grid(tmp_path, {"axes": {"method": ["lora"]}, "generate": {"prompt": "x", "seeds": 3}})
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    assert "generate settings" in info.value.render() and "did you mean 'seed'" in info.value.render()
    path = write_grid(tmp_path, {"axes": {"method": ["lora"]}, "generate": {"prompt": "x"},
                                 "evaluate": {"metrics": ["fidelty"]}})
    with pytest.raises(ConfigError, match="evaluate settings"):
        load_plan(path)
    path = write_grid(tmp_path, {"axes": {"method": ["lora"]}, "generate": {"prompt": "x", "out": "somewhere"}})
    with pytest.raises(ConfigError, match="generate.out is set by the grid"):
        load_plan(path)
