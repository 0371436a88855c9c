"""Fixtures for training tests: a tiny fixture data set and a config builder for 64 px tiny runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from train_helpers import deep_update, tiny_config_dict  # noqa: F401  (re-exported)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """Eight synthetic 64 px chest X-rays in the Shenzhen layout (captions from the readings)."""
    from synthcxr.data.fixtures import make_fixture_dataset

    return make_fixture_dataset(tmp_path_factory.mktemp("train_data"), "shenzhen", n=8, size=64, seed=0)


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
