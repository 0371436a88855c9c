"""The grid's `model` axis: one grid compares model families, each model with its own settings;
configs/family_grid.yaml expands as documented and runs end to end on tiny models of all six families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from synthcxr.errors import ConfigError
from synthcxr.grid.expand import load_plan

REPO = Path(__file__).resolve().parents[2]


def test_family_grid_expands_with_per_model_overrides():
    plan = load_plan(REPO / "configs" / "family_grid.yaml")
    runs = {r.name: r.train for r in plan.runs}
    assert list(runs) == ["sd15", "sdxl", "sd35m", "pixart_sigma", "sana", "flux_dev"]
    assert runs["sd15"]["method"]["name"] == "full" and runs["sd15"]["optimizer"]["lr"] == 5e-6
    assert runs["sd15"]["model"]["path"] == "models/stable-diffusion-v1-5"
    assert runs["sd35m"]["method"]["rank"] == 32 and runs["sd35m"]["data"]["resolution"] == 1024
    assert runs["sdxl"]["train"]["max_steps"] == 2000  # the base applies to every model
    # the public benchmark's recipes: PixArt-Σ and Sana full fine-tuning, Flux.1-dev LoRA r32 (on an NF4 base)
    assert runs["pixart_sigma"]["method"]["name"] == "full" and runs["sana"]["method"]["name"] == "full"
    assert runs["flux_dev"]["method"] == {**runs["flux_dev"]["method"], "name": "lora", "rank": 32}
    assert runs["flux_dev"]["model"]["quantize"] == "nf4"
    generate = {r.name: plan.generate_for(r) for r in plan.runs}
    assert {k: (g["steps"], g["guidance"], g["resolution"]) for k, g in generate.items() if "steps" in g} == {
        "pixart_sigma": (20, 4.5, 512), "sana": (20, 4.5, 512), "flux_dev": (28, 3.5, 512)}
    assert all(g["n"] == 500 and g["seed"] == 1000 for g in generate.values())  # shared prompts and seeds


def test_a_model_block_may_set_its_own_generate_settings(tmp_path):
    grid = {"name": "g", "generate": {"prompt": "x", "n": 4}, "evaluate": {"real": "data"},
            "base": {"model": {"path": "unused"}, "data": {"path": "data"}},
            "axes": {"model": {"a": {"model.path": "/m/a", "generate.steps": 7, "generate.resolution": 64},
                               "b": {"model.path": "/m/b"}}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    plan = load_plan(tmp_path / "grid.yaml")
    a, b = plan.runs
    assert plan.generate_for(a) == {"prompt": "x", "n": 4, "steps": 7, "resolution": 64}
    assert plan.generate_for(b) == {"prompt": "x", "n": 4} and "generate" not in a.train
    assert a.overrides == {"model.path": "/m/a", "generate.steps": 7, "generate.resolution": 64}
    grid["axes"]["model"]["a"]["generate.stepz"] = 3
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    with pytest.raises(ConfigError, match="stepz"):
        load_plan(tmp_path / "grid.yaml")


def test_model_axis_as_a_list_of_paths_names_runs_by_folder(tmp_path):
    grid = {"name": "g", "generate": {"prompt": "x"}, "evaluate": {"real": "data"},
            "base": {"model": {"path": "unused"}, "data": {"path": "data"}},
            "axes": {"model": ["/models/sd-tiny/", "runs/sdxl_tiny"], "method": ["lora", "full"]},
            "exclude": [{"model": "runs/sdxl_tiny", "method": "full"}]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    plan = load_plan(tmp_path / "grid.yaml")
    assert [r.name for r in plan.runs] == ["sd-tiny-lora", "sd-tiny-full", "sdxl_tiny-lora"]
    assert plan.runs[2].train["model"]["path"] == "runs/sdxl_tiny"


@pytest.mark.slow
def test_family_grid_runs_end_to_end_on_tiny_models(tiny_family_model, tiny_model_dir, tmp_path, monkeypatch):
    from synthcxr.data.fixtures import make_fixture_dataset
    from synthcxr.grid.run import run_grid

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")
    data = make_fixture_dataset(tmp_path / "data", "shenzhen", n=6, size=64, seed=0)
    grid = yaml.safe_load((REPO / "configs" / "family_grid.yaml").read_text())
    models = {"sd15": tiny_model_dir, "sdxl": tiny_family_model("sdxl"), "sd35m": tiny_family_model("sd3"),
              "pixart_sigma": tiny_family_model("pixart"), "sana": tiny_family_model("sana"),
              "flux_dev": tiny_family_model("flux")}
    for label, block in grid["axes"]["model"].items():
        block.update({"model.path": str(models[label]), "data.resolution": 32, "train.batch_size": 1,
                      "train.gradient_accumulation": 1, "generate.resolution": 32, "generate.steps": 2})
    grid["base"]["data"].update({"path": str(data), "split": {"val": 0.0, "test": 0.0}})
    grid["base"]["train"].update({"max_steps": 2, "mixed_precision": "no", "gradient_checkpointing": False,
                                  "cache_latents": "ram", "checkpoint_every": 2, "validate_every": None,
                                  "validation_seeds": []})
    grid["generate"].update({"n": 6, "steps": 2, "device": "cpu", "resolution": 32})
    grid["evaluate"] = {"real": str(data), "extractor": {"name": "random", "device": "cpu"}, "metrics": ["fidelity"]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))

    result = run_grid(load_plan(tmp_path / "grid.yaml"), tmp_path / "out")
    assert result.ok, [r.error for r in result.results]
    families = {}
    for run in models:
        summary = json.loads((tmp_path / "out" / "runs" / run / "train" / "summary.json").read_text())
        families[run] = summary["family"]
        assert len(list((tmp_path / "out" / "runs" / run / "images").glob("*.png"))) == 6
    assert families == {"sd15": "sd", "sdxl": "sdxl", "sd35m": "sd3", "pixart_sigma": "pixart", "sana": "sana",
                        "flux_dev": "flux"}
    from synthcxr.report.build import build_report

    report = Path(build_report(tmp_path / "out")).read_text()
    assert all(label in report for label in ("Stable Diffusion XL", "Stable Diffusion 3", "PixArt", "Sana", "Flux"))
