"""benchmarks/families.py (train_step.py / generate.py --family F) runs both sides on a tiny model and
reports a finite ratio; the timing itself is recorded in BENCHMARKS.md, not asserted."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "families.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_families", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_family_train_step_and_generate_benchmarks_run(tmp_path):
    bench = _module()
    step = bench.train_step_benchmark("sd3", res=32, bs=1, warmup=1, repeats=1, steps=1, out=str(tmp_path / "t.json"))
    gen = bench.generate_benchmark("sd3", res=32, n=1, batch=1, steps=2, repeats=1)
    for result in (step, gen):
        assert result["family"] == "sd3" and math.isfinite(result["ratio_ours_vs_reference"])
        assert result["ratio_ours_vs_reference"] > 0 and result["ratio_ours_vs_reference_min"] > 0
    assert (tmp_path / "t.json").is_file()
    full = bench.train_step_benchmark("pixart", res=32, bs=1, warmup=1, repeats=1, steps=1)  # full fine-tuning
    assert full["method"] == "full" and math.isfinite(full["ratio_ours_vs_reference"])
    with pytest.raises(SystemExit, match="covers sdxl, sd3, flux, pixart, sana"):
        bench.train_step_benchmark("sd", res=32, bs=1, warmup=1, repeats=1, steps=1)
