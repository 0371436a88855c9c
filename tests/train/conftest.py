"""Fixtures for training tests: a tiny fixture data set and a config builder for 64 px tiny runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """Eight synthetic 64 px chest X-rays in the Shenzhen layout (captions from the readings)."""
    from synthcxr.data.fixtures import make_fixture_dataset

    return make_fixture_dataset(tmp_path_factory.mktemp("train_data"), "shenzhen", n=8, size=64, seed=0)


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


@pytest.fixture
def make_config(tiny_model_dir, train_data):
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(**sections: dict[str, Any]) -> TrainConfig:
        return build_config(TrainConfig, tiny_config_dict(tiny_model_dir, train_data, **sections))

    return make


@pytest.fixture(autouse=True)
def _one_thread():
    """Deterministic CPU numerics (and fair to the other tests on a small machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def read_trainable():
    """run dir -> trainable weights of its newest checkpoint."""
    from safetensors.torch import load_file

    from synthcxr.train.checkpoint import latest_checkpoint

    return lambda run: load_file(str(latest_checkpoint(Path(run) / "checkpoints") / "trainable.safetensors"))
