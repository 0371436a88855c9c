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
def tiny_family_model(tmp_path_factory):
    """family name -> a tiny random pipeline folder of that family (32 px; built once per session)."""
    from synthcxr.models.families import get_family

    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny_{family}") / "model"
            built[family] = get_family(family).write_tiny(out, resolution=32, seed=0)
        return built[family]

    return make


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
