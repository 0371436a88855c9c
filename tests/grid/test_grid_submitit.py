"""`--launcher slurm` goes through submitit; its local executor runs the same jobs as processes."""

from __future__ import annotations

import sys

import cloudpickle
import grid_fakes
import pytest
import yaml
from grid_fakes import FakeStages

from synthcxr.grid.expand import expand_grid, load_grid
from synthcxr.grid.run import Stages, run_grid

# the fakes live in a test folder the job processes cannot import: ship them by value
cloudpickle.register_pickle_by_value(grid_fakes)


def plan_for(tmp_path):
    grid = {"name": "s", "base": {"model": {"path": "m"}, "data": {"path": "d", "resolution": 64}},
            "axes": {"method": ["lora"], "optimizer": ["adamw", "prodigy"]}, "baseline": True,
            "generate": {"prompt": "p", "n": 2}, "launcher": {"slurm": {"timeout_min": 5}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return expand_grid(load_grid(path), grid_file=path)


@pytest.mark.parametrize("executor_kind", ["local", "debug"])
def test_submitit_executors_run_every_run_and_isolate_failures(tmp_path, executor_kind):
    import submitit

    plan = plan_for(tmp_path)
    fake = FakeStages(tmp_path / "calls.jsonl", fail={"lora-prodigy"})
    stages = Stages(train=fake.train, generate=fake.generate, evaluate=fake.evaluate)
    folder = tmp_path / "jobs" / "%j"
    if executor_kind == "local":
        executor = submitit.LocalExecutor(folder=folder, python=sys.executable)
        executor.update_parameters(timeout_min=5)
    else:
        executor = submitit.DebugExecutor(folder=folder)
    out = tmp_path / "out"
    result = run_grid(plan, out, launcher="slurm", stages=stages, executor=executor)
    by = {r.name: r for r in result.results}
    assert by["baseline"].status == "done" and by["lora-adamw"].status == "done"
    assert by["lora-prodigy"].status == "failed" and "simulated training failure" in by["lora-prodigy"].error
    assert (out / "runs" / "lora-adamw" / "eval.json").is_file()
    assert len(fake.calls("train")) == 2  # the calls happened inside the jobs
    # a rerun through the executor skips the finished runs' steps
    fake.fail.clear()
    again = run_grid(plan, out, launcher="slurm", stages=stages, executor=executor)
    assert again.ok
    assert {r.name: r.steps.get("train") for r in again.results} == {
        "baseline": "none", "lora-adamw": "skipped", "lora-prodigy": "ran"}
