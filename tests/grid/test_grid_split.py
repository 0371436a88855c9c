"""The grid's one saved patient-level split: no run trains on a patient the utility test measures on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from grid_fakes import FakeStages

from synthcxr.config import build_config
from synthcxr.data.fixtures import make_fixture_dataset
from synthcxr.data.splits import read_split
from synthcxr.grid import stages as real_stages
from synthcxr.grid.expand import expand_grid, load_grid
from synthcxr.grid.run import Stages, run_grid


def _train_like_the_engine(config: dict[str, Any], out_dir: Path, resume: bool) -> Path:
    """The training loop's data step (its two data-layer calls: records -> split saved in the run), then DONE."""
    from synthcxr.data.dataset import load_records
    from synthcxr.data.splits import split_records
    from synthcxr.train.config import TrainConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = build_config(TrainConfig, config, "test")
    split_records(load_records(cfg.data), cfg.data.split, out_path=out / "splits.json")
    (out / "DONE").write_text("ok\n")
    return out


def _patients(split_file: Path, side: str) -> set[str]:
    return {row["patient_id"] for row in json.loads(split_file.read_text())["images"] if row["split"] == side}


def test_grid_holds_out_test_patients_from_every_runs_training(tmp_path):
    data = make_fixture_dataset(tmp_path / "data", "shenzhen", n=20, size=32)
    grid = {"name": "split", "base": {"model": {"path": "models/tiny"},
                                      "data": {"path": str(data), "resolution": 32, "split": {"val": 0.2, "test": 0.2}},
                                      "method": {"name": "lora"}, "optimizer": {"name": "adamw", "lr": 1e-4}},
            "axes": {"lr": [1e-4, 2e-4], "seed": [0, 1]}, "baseline": True,
            "generate": {"prompt": "a chest x-ray", "n": 2}, "evaluate": {"metrics": ["utility"]},
            "study": {"per_model": 1, "real_count": 2}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    plan = expand_grid(load_grid(path), grid_file=path)
    fake = FakeStages(tmp_path / "calls.jsonl")
    evaluations: list[dict[str, Any]] = []

    def evaluate(settings, images_dir, out_json, train_config):
        evaluations.append(dict(settings))
        return fake.evaluate(settings, images_dir, out_json, train_config)

    studies: list[Any] = []

    def study(request):
        studies.append(request)
        return fake.study(request)

    out = tmp_path / "out"
    result = run_grid(plan, out, stages=Stages(train=_train_like_the_engine, generate=fake.generate, evaluate=evaluate,
                                               split=real_stages.split_stage, study=study))
    assert result.ok, result.describe()
    shared = out / "split.json"
    test_patients = _patients(shared, "test")
    assert test_patients
    runs = [r for r in plan.runs if not r.is_baseline]
    assert len(runs) == 4  # the seed axis would give each run a different split without the shared file
    for spec in runs:
        trained = out / "runs" / spec.name / "train" / "splits.json"
        assert read_split(trained) == read_split(shared)
        assert not test_patients & (_patients(trained, "train") | _patients(trained, "val"))
    # every evaluation (the baseline's too) tests the classifier on the shared split's test patients
    assert len(evaluations) == 5 and all(e["split"] == str(shared.resolve()) for e in evaluations)
    from synthcxr.evaluate.images import read_image_set
    from synthcxr.evaluate.utility import items_by_split

    sides = items_by_split(read_image_set(evaluations[0]["train"], "train").items, Path(evaluations[0]["split"]))
    assert {it.patient_id for it in sides["test"]} == test_patients
    # the reader study's real controls are held-out patients too
    assert studies and isinstance(studies[0].real, list) and len(studies[0].real) >= 2
    assert {Path(p).stem.rsplit("_", 1)[0] for p in studies[0].real} <= test_patients
    # rerun: nothing is split or trained again, the saved split is kept as it is
    before = shared.read_text()
    again = run_grid(plan, out, stages=Stages(train=_train_like_the_engine, generate=fake.generate, evaluate=evaluate,
                                              split=real_stages.split_stage))
    assert again.ok and shared.read_text() == before


def test_a_split_without_test_patients_is_shared_for_training_and_warned_about(tmp_path, caplog):
    data = make_fixture_dataset(tmp_path / "data", "shenzhen", n=10, size=32)
    grid = {"name": "no-test", "base": {"model": {"path": "models/tiny"},
                                        "data": {"path": str(data), "resolution": 32, "split": {"val": 0.2, "test": 0.0}},
                                        "method": {"name": "lora"}, "optimizer": {"name": "adamw", "lr": 1e-4}},
            "axes": {"lr": [1e-4]}, "generate": {"prompt": "a chest x-ray", "n": 2}, "evaluate": {"metrics": ["utility"]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    plan = expand_grid(load_grid(path), grid_file=path)
    fake = FakeStages(tmp_path / "calls.jsonl")
    seen: list[dict[str, Any]] = []

    def evaluate(settings, images_dir, out_json, train_config):
        seen.append(dict(settings))
        return fake.evaluate(settings, images_dir, out_json, train_config)

    with caplog.at_level("WARNING", logger="synthcxr"):
        result = run_grid(plan, tmp_path / "out", stages=Stages(train=_train_like_the_engine, generate=fake.generate,
                                                                evaluate=evaluate, split=real_stages.split_stage))
    assert result.ok and seen and "split" not in seen[0]
    assert "holds out no test patients" in caplog.text
    assert read_split(tmp_path / "out" / "runs" / "lr0.0001" / "train" / "splits.json") == read_split(tmp_path / "out" / "split.json")
