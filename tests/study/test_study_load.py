"""Concurrent readers on loopback: every answer stored exactly once (small run; full 20x50 is slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "study_load.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("study_load", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(result: dict, readers: int, answers: int) -> None:
    assert result["errors"] == []
    assert result["stored"] == readers * answers == result["distinct_tasks"]
    assert result["per_reader_min"] == result["per_reader_max"] == answers
    assert result["double_submits"] == readers * (answers // 10)
    assert result["answers_per_s"] > 0 and result["post_p95_ms"] > 0


def test_small_concurrent_load(tmp_path):
    _check(_load_module().run_load(readers=5, answers=10, workdir=tmp_path), 5, 10)


@pytest.mark.slow
def test_full_load_20_readers_x_50_answers(tmp_path):
    _check(_load_module().run_load(readers=20, answers=50, workdir=tmp_path), 20, 50)
