"""The real stage engines behind the grid's `Stages` interface.

Each adapter turns the grid's plain settings into the stage's own typed config and calls the
stage's public function. They are module-level functions so submitit can pickle them into
cluster jobs. Heavy imports happen inside, when a stage actually runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from synthcxr.config import build_config
from synthcxr.fileio import atomic_write_json
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)


def split_stage(data: dict[str, Any], path: Path) -> Path:
    """The grid's one patient-level split of the base data set, saved before any run trains.

    Every run trains on its `train` patients only (`data.split.file`), and evaluation tests the
    classifier on its `test` patients, so no number is measured on patients a generator learned from.
    """
    from synthcxr.data.config import DataConfig
    from synthcxr.data.dataset import load_records
    from synthcxr.data.splits import split_records

    cfg = build_config(DataConfig, data, "the grid's base data config")
    split_records(load_records(cfg), cfg.split.model_copy(update={"file": None}), Path(path))
    return Path(path)


def train_stage(config: dict[str, Any], out_dir: Path, resume: bool) -> Path:
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.loop import train

    cfg = build_config(TrainConfig, config, f"train config of {Path(out_dir).parent.name}")
    return train(cfg, Path(out_dir), resume=resume)


def generate_stage(settings: dict[str, Any], model: str, out_dir: Path) -> Path:
    from synthcxr.generate.sample import GenerateConfig, generate_images

    cfg = build_config(GenerateConfig, {**settings, "model": str(model), "out": str(out_dir)}, "grid generate settings")
    return generate_images(cfg)


def evaluate_stage(settings: dict[str, Any], images_dir: Path, out_json: Path,
                   train_config: dict[str, Any] | None) -> dict[str, Any]:
    """Evaluate one run's images; memorization is checked against the run's own training data
    unless the grid names a `train` set explicitly."""
    from synthcxr.evaluate.run import EvaluateConfig, evaluate
    from synthcxr.grid.expand import single_folder

    data = {**settings, "fake": str(images_dir), "out": str(out_json)}
    if not data.get("train") and train_config:
        data["train"] = single_folder((train_config.get("data") or {}).get("path"))
    cfg = build_config(EvaluateConfig, data, "grid evaluate settings")
    return evaluate(cfg)


def study_stage(request: Any) -> dict[str, Any] | None:
    """Create one blinded study over all runs (once), optionally simulate answers, and analyse.

    Without `simulate` the study waits for real readers: the invite links are written to
    `study/invites.json` (readable by the owner only) and the analysis happens later with
    `synthcxr study analyze`.
    """
    from synthcxr.study import service

    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    db = request.db or f"sqlite:///{(out_dir / 'study.sqlite3').resolve()}"
    created_marker = out_dir / "created.json"
    if not created_marker.exists():
        created = service.create_study(
            db, request.name, real=request.real, models=[(n, p) for n, p in request.models.items()],
            per_model=request.per_model, real_count=request.real_count, readers=request.readers,
            study_dir=out_dir, **request.options,
        )
        invites = out_dir / "invites.json"
        atomic_write_json(invites, {"study": created.name, "db": db, "invites": created.invites,
                                    "admin_token": created.admin_token})
        os.chmod(invites, 0o600)
        atomic_write_json(created_marker, {"study": created.name, "db": db, "n_images": created.n_images,
                                           "groups": created.groups})
        log.info("reader study %r created with %d images; invite links in %s", created.name, created.n_images, invites)
    info = json.loads(created_marker.read_text())
    if not request.simulate:
        return None
    service.simulate_answers(info["db"], info["study"])
    return service.analyze_study(info["db"], info["study"], out_dir / "analysis")
