"""Generated data sets for the data-layer tests (64 px, built once; tests that damage data copy them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from synthcxr.data.fixtures import make_fixture_dataset


@pytest.fixture(scope="session")
def fixture_sets(tmp_path_factory) -> dict[str, Path]:
    """All four layouts in one parent folder: {layout: dataset root, "parent": the folder}."""
    parent = tmp_path_factory.mktemp("fixture_sets")
    roots = {layout: make_fixture_dataset(parent, layout, n=8, size=64, seed=0)
             for layout in ("shenzhen", "montgomery", "folder", "dicom")}
    roots["parent"] = parent
    return roots


@pytest.fixture
def copy_of(fixture_sets, tmp_path):
    """A private copy of one generated layout, safe to damage: copy_of("shenzhen") -> its root."""

    def _copy(layout: str) -> Path:
        src = fixture_sets[layout]
        dst = tmp_path / layout / src.name
        shutil.copytree(src, dst)
        return dst

    return _copy
