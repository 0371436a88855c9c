"""Sharded generation: ranks of one torchrun job and submitit cluster shards make the same bytes as
one process; a killed shard is reported, the others finish, and a re-run makes only what is missing."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from synthcxr.errors import ConfigError, SynthCXRError
from synthcxr.generate.manifest import MANIFEST, SHARD_GLOB, ManifestState, merge_shards, shard_manifest
from synthcxr.generate.shard import Shard


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")


def images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("0*.png"))}


class _Job:
    def __init__(self, index: int):
        self.index = index


def test_shards_split_whole_batches_statically():
    batches = [([_Job(i) for i in range(s, s + 3)], {s}) for s in range(0, 21, 3)]
    taken = [[b[0][0].index for b in Shard(r, 3).batches(batches, 3)] for r in range(3)]
    assert taken == [[0, 9, 18], [3, 12], [6, 15]]
    resumed = [b for b in batches if b[0][0].index != 9]  # batch 1 of shard 0 already done
    assert [b[0][0].index for b in Shard(0, 3).batches(resumed, 3)] == [0, 18]  # the others keep their batches
    assert Shard.from_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}) == Shard(1, 2, group=True)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not"):
        Shard.from_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert Shard.from_env({}) == Shard(0, 1)
    with pytest.raises(ConfigError, match="outside"):
        Shard.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_shard_manifests_count_as_done_and_merge_in_order(tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    planned = {f"{i:05d}.png": {"file": f"{i:05d}.png", "index": i, "seed": i} for i in range(4)}
    a = ManifestState.open(out, planned, shard_file=shard_manifest(1), readonly=True)
    a.write(3, b"three", created="t")
    b = ManifestState.open(out, planned, shard_file=shard_manifest(0), readonly=True)
    b.write(0, b"zero", created="t")
    assert not (out / MANIFEST).exists() and len(list(out.glob(SHARD_GLOB))) == 2
    assert ManifestState.open(out, planned, readonly=True).done == {0, 3}
    assert merge_shards(out) == 2
    assert not list(out.glob(SHARD_GLOB))
    assert [json.loads(x)["index"] for x in (out / MANIFEST).read_text().splitlines()] == [0, 3]
    assert ManifestState.open(out, planned).done == {0, 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate_args(model: Path, out: Path, n: int) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "a chest x-ray", "-n", str(n), "--steps", "2",
            "--batch-size", "2", "--out", str(out), "--device", "cpu"]


@pytest.mark.slow
def test_torchrun_two_ranks_byte_identical_to_one_process(tiny_model_dir, tmp_path):
    n = 6  # 3 batches: rank 0 makes batches 0 and 2, rank 1 batch 1
    # one CPU thread per process on both sides: threaded reductions round differently with another count
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "synthcxr", *_generate_args(tiny_model_dir, tmp_path / "one", n)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "synthcxr", *_generate_args(tiny_model_dir, tmp_path / "two", n)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = images(tmp_path / "one"), images(tmp_path / "two")
    assert len(one) == n and one == two
    assert (tmp_path / "two" / MANIFEST).read_bytes() == (tmp_path / "one" / MANIFEST).read_bytes()
    assert not list((tmp_path / "two").glob(SHARD_GLOB)) and not (tmp_path / "two" / ".lock").exists()


def _killed_once(cfg, rank: int, shards: int, *, kill_rank: int, marker: str):
    """A shard job that is SIGKILLed after its first image the first time it runs."""
    from synthcxr.generate.sample import generate_images
    from synthcxr.generate.shard import run_shard

    if rank == kill_rank and not os.path.exists(marker):
        Path(marker).touch()
        generate_images(cfg, shard=Shard(rank, shards), on_image=lambda row: os.kill(os.getpid(), signal.SIGKILL))
    return run_shard(cfg, rank, shards)


@pytest.mark.slow
def test_submitit_shards_one_killed_then_resumed(tiny_model_dir, tmp_path):
    import cloudpickle
    import submitit

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.generate.shard import run_sharded

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = GenerateConfig(model=str(tiny_model_dir), prompt="a chest x-ray", n=8, steps=2, batch_size=2,
                         device="cpu", out=tmp_path / "sharded")
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs" / "%j", python=sys.executable)
    executor.update_parameters(timeout_min=10)
    task = functools.partial(_killed_once, kill_rank=1, marker=str(tmp_path / "killed"))
    with pytest.raises(SynthCXRError, match="1 of 2 shard"):
        run_sharded(cfg, 2, executor=executor, task=task)
    rows = [json.loads(x) for x in (cfg.out / MANIFEST).read_text().splitlines()]
    # shard 0 (batches 0, 2: images 0, 1, 4, 5) finished; shard 1 wrote one image before it was killed
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 4, 5]
    assert not list(cfg.out.glob(SHARD_GLOB))
    results = run_sharded(cfg, 2, executor=executor, task=task)
    assert [r["status"] for r in results] == ["done", "done"]
    single = generate_images(cfg.model_copy(update={"out": tmp_path / "single"}))
    assert images(cfg.out) == images(single) and len(images(single)) == 8
    assert (cfg.out / MANIFEST).read_bytes() == (single / MANIFEST).read_bytes()


def test_cli_launcher_mistakes_are_explained(tmp_path, capsys):
    from synthcxr.cli import main

    base = ["generate", "--model", str(tmp_path / "m"), "--prompt", "p", "--out", str(tmp_path / "o")]
    for extra, message in ((["--shards", "2"], "--shards 2 needs --launcher slurm"),
                           (["--launcher", "slurn"], "did you mean 'slurm'"),
                           (["--launcher", "slurm", "--slurm", "partition"], "is not key=value")):
        with pytest.raises(SystemExit):
            main([*base, *extra])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
