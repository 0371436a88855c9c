"""Shared fixtures: the tiny model and generated data sets are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SYNTHCXR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random SD pipeline folder (64 px, epsilon prediction)."""
    from synthcxr.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", sample_size=64)


@pytest.fixture(scope="session")
def shared_shenzhen() -> Path:
    """The real 16-image Shenzhen sample when present; skipped on a fresh clone without it."""
    root = SHARED_DATA / "ChinaSet_AllFiles"
    if not (root / "CXR_png").is_dir():
        pytest.skip(f"shared Shenzhen sample not found at {root}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """Tests never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
