"""A grid folder made by the real runner with fake stages: every file in the real stages' shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

GRID_TESTS = str(Path(__file__).resolve().parents[1] / "grid")
if GRID_TESTS not in sys.path:  # the fake stages live beside the grid tests
    sys.path.insert(0, GRID_TESTS)

from grid_fakes import FakeStages  # noqa: E402


@pytest.fixture(scope="session")
def fake_grid(tmp_path_factory) -> Path:
    """Baseline + three trained runs, one failing, with a simulated study and real images."""
    import yaml

    from synthcxr.grid.expand import expand_grid, load_grid
    from synthcxr.grid.run import Stages, run_grid

    root = tmp_path_factory.mktemp("report_grid")
    real = root / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(real / f"real_{i}.png")
    grid = {"name": "report-test", "base": {"model": {"path": "models/tiny"}, "data": {"path": str(real), "resolution": 64}},
            "axes": {"method": ["dreambooth", "lora"], "optimizer": ["adamw", "prodigy"]},
            "exclude": [{"method": "dreambooth", "optimizer": "adamw"}], "baseline": True,
            "generate": {"prompt": "a sks chest x-ray", "n": 3, "seed": 5}, "evaluate": {"real": str(real)},
            "study": {"simulate": True, "per_model": 2, "real_count": 2}}
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    plan = expand_grid(load_grid(path), grid_file=path)
    fake = FakeStages(root / "calls.jsonl", fail={"dreambooth-prodigy"})
    out = root / "out"
    run_grid(plan, out, stages=Stages(fake.train, fake.generate, fake.evaluate, fake.study))
    return out
