"""Sharded generation at the issue's scale: a 1,000-image set is byte-identical from one process and from
two ranks (torchrun and accelerate launch), and a second job on the folder is refused while the first
job's ranks hold its lock."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthcxr.generate.manifest import MANIFEST, SHARD_GLOB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

N = 1000
ARGS = ["--prompt", "a chest x-ray", "--steps", "1", "--resolution", "16", "--device", "cpu"]
# one CPU thread per process on every side: threaded reductions round differently with another count
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SOURCE_DATE_EPOCH": "1780000000"}
LAUNCHERS = {
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_addr", "127.0.0.1", "--master_port", str(_free_port())],
    # accelerate's --cpu starts a single process; --multi_gpu starts torchrun-style ranks (on the CPU here)
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(_free_port())],
}


def _generate(launch: list[str], model: Path, out: Path, n: int, batch: int, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*launch, "-m", "synthcxr", "generate", "--model", str(model), "-n", str(n),
                           "--batch-size", str(batch), "--out", str(out), *ARGS],
                          env=ENV, capture_output=True, text=True, timeout=600, **kw)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "gen"
    res = _generate([sys.executable], tiny_model_dir, out, N, 50)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_thousand_images_are_byte_identical_from_one_process_and_two_ranks(one_process, tiny_model_dir, tmp_path,
                                                                             launcher):
    out = tmp_path / "gen"
    started = time.perf_counter()
    res = _generate(LAUNCHERS[launcher](), tiny_model_dir, out, N, 50)  # 20 batches: 10 per rank
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = _files(one_process), _files(out)
    assert len(one) == N and one == two, f"{sum(one.get(k) != v for k, v in two.items())} image(s) differ"
    assert (out / MANIFEST).read_bytes() == (one_process / MANIFEST).read_bytes()
    assert not list(out.glob(SHARD_GLOB)) and not (out / ".lock").exists()
    print(f"{launcher}: {N} images from 2 ranks in {time.perf_counter() - started:.1f} s")


@pytest.mark.slow
def test_a_second_job_is_refused_while_the_first_jobs_ranks_hold_the_lock(tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    first = subprocess.Popen([*LAUNCHERS["torchrun"](), "-m", "synthcxr", "generate", "--model", str(tiny_model_dir),
                              "-n", "20000", "--batch-size", "4", "--out", str(out), *ARGS], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # both ranks are writing: each has its own shard manifest with lines in it
        while len([p for p in out.glob(SHARD_GLOB) if p.stat().st_size]) < 2:
            assert first.poll() is None, "the first job ended early"
            assert time.monotonic() < deadline, "the first job's ranks did not start writing"
            time.sleep(0.5)
        second = _generate(LAUNCHERS["torchrun"](), tiny_model_dir, out, 20000, 4)
        assert second.returncode != 0
        err = re.sub(r"\s+", " ", second.stderr)  # the terminal width wraps lines anywhere
        assert f"{out}: another `synthcxr generate` is writing into this output folder" in err
        assert re.search(rf"lock {re.escape(str(out / '.lock'))} is held by process \d+ on {socket.gethostname()}", err)
        assert "Fix: wait for it to finish" in err and "--out" in err
        assert err.count("another `synthcxr generate` is writing") >= 2, "each rank of the second job says why"
        assert first.poll() is None, "the refused job disturbed the running one"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
