"""`synthcxr evaluate` under torchrun / accelerate launch: each rank extracts the features of its share
into the content-hash cache, rank 0 computes the metrics, and every number equals the one-process run."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from synthcxr.errors import ConfigError
from synthcxr.evaluate.distributed import evaluate_ranks
from synthcxr.evaluate.run import EvaluateConfig
from synthcxr.generate.shard import Shard

from .conftest import make_images


def test_a_rank_takes_whole_batches_and_the_cache_must_be_on(tmp_path):
    items = list(range(21))
    shares = [Shard(r, 2, group=True).share(items, 4) for r in range(2)]
    assert shares == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19], [4, 5, 6, 7, 12, 13, 14, 15, 20]]
    assert Shard().share(items, 4) == items
    cfg = EvaluateConfig(real=tmp_path, fake=tmp_path, cache=False)
    with pytest.raises(ConfigError, match="through the feature cache") as exc:
        evaluate_ranks(cfg, Shard(0, 2, group=True))
    assert "cache=false" in str(exc.value)


def test_rank0_finds_the_shares_in_the_cache_and_warns_about_missing_ones(tmp_path, monkeypatch, caplog):
    """In one process: rank 0 of a 2-rank job whose partner never ran (a cache the ranks do not share)."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    real = make_images(tmp_path / "real", 10, size=32, seed=1)
    fake = make_images(tmp_path / "fake", 10, size=32, seed=2)
    cfg = EvaluateConfig(real=real, fake=fake, out=tmp_path / "e.json", metrics=["fidelity"],
                         extractor={"name": "random", "device": "cpu", "batch_size": 4}, fidelity={"ci_groups": 0})
    results = evaluate_ranks(cfg, Shard(0, 2, group=True))
    # rank 0's share (batches 0 and 2: 4 + 2 images of each set) came from the cache, the rest it computed
    assert results["features"] == {"real": {"computed": 4, "cached": 6}, "fake": {"computed": 4, "cached": 6}}
    assert "that the other ranks should have cached" in caplog.text and (tmp_path / "e.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(launch: list[str], args: list[str], cache: Path) -> subprocess.CompletedProcess:
    # one CPU thread per process on both sides: threaded reductions round differently with another count
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNTHCXR_CACHE_DIR": str(cache), "COLUMNS": "300"}
    res = subprocess.run([*launch, "-m", "synthcxr", *args], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


LAUNCHERS = {
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_addr", "127.0.0.1", "--master_port", str(_free_port())],
    # accelerate's --cpu starts one process; --multi_gpu starts torchrun-style ranks (on the CPU here)
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(_free_port())],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ranks_share_feature_extraction_and_results_equal_one_process(tmp_path, launcher):
    real = make_images(tmp_path / "real", 40, size=32, seed=1)
    fake = make_images(tmp_path / "fake", 36, size=32, seed=2, layout="generation")
    args = ["evaluate", "--real", str(real), "--fake", str(fake), "--metrics", "fidelity,memorization",
            "--extractor", "random", "--set", "extractor.batch_size=8", "--set", "extractor.device=cpu",
            "--set", "fidelity.ci_groups=4", "--set", "memorization.top_pairs=0"]
    _run([sys.executable], [*args, "--out", str(tmp_path / "one.json")], tmp_path / "cache1")
    res = _run(LAUNCHERS[launcher](), [*args, "--out", str(tmp_path / "two.json")], tmp_path / "cache2")
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))

    # the ranks computed every feature (rank 0: batches 0, 2, 4 of each set; rank 1: batches 1, 3)
    assert one["features"] == {"real": {"computed": 40, "cached": 0}, "fake": {"computed": 36, "cached": 0}}
    assert two["features"] == {"real": {"computed": 0, "cached": 40}, "fake": {"computed": 0, "cached": 36}}
    log = re.sub(r"\s+", " ", res.stdout + res.stderr)
    assert "rank 1/2 computed 44 feature(s)" in log and "rank 2/2 computed 32 feature(s)" in log
    with sqlite3.connect(tmp_path / "cache2" / "features.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM features").fetchone()[0] == 76
    # ... and every number equals the one-process run's
    assert two["fidelity"] == one["fidelity"]
    for key in ("n_flagged", "feature_cosine", "copy_similarity", "thresholds"):
        assert two["memorization"][key] == one["memorization"][key], key
    assert res.stdout.count("synthcxr evaluate") == 1  # one results table, from rank 0
