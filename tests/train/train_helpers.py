"""Config builders for training tests, importable by name from test modules (`from train_helpers import ...`);
`from conftest import` would get whichever directory's conftest pytest imported last."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def tiny_config_dict(model_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A fast CPU config: 32 px (the tiny model is resolution-agnostic), batch 2, 3 steps, no sample images, checkpoints every step."""
    base = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_dir), "resolution": 32, "split": {"val": 0.0, "test": 0.0}},
        "method": {"name": "lora", "rank": 4},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "train": {"max_steps": 3, "batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 10, "log_every": 1,
                  "validation_seeds": [], "validation_steps": 1, "seed": 0},
    }
    return deep_update(base, sections)
