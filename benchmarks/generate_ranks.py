#!/usr/bin/env python3
"""Images/s of `synthcxr generate` in one process vs N processes under torchrun (same set, same bytes).

Each process should keep the single-process rate on its share (no extra host work per image), so
the speedup approaches N where N cores/GPUs are free. Both runs write into fresh folders and one
JSON line is printed. `byte_identical` compares the sets; on the CPU it needs the same number of
threads per process on both sides (by default the single process uses all cores, so expect rounding
differences of one grey level in a few pixels; `--one-threads 1` gives equal threads; the tests check
identity at equal thread counts). Wall times include process start and model load; the `loop_*`
figures are the generation loop alone, from the image files' write times after each process's first
batch.

    python benchmarks/generate_ranks.py                      # tiny model, CPU, 2 processes, 16 images
    python benchmarks/generate_ranks.py --procs 2 --n 400 --steps 2 --batch 8 --resolution 32 --one-threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _loop_rate(out: Path, first: int) -> float:
    """Images/s of the generation loop alone, from the image files' write times: the images after the
    first `first` (each process's first batch, which also pays for start-up) over the time they took."""
    times = sorted(p.stat().st_mtime for p in out.glob("0*.png"))
    return (len(times) - first) / (times[-1] - times[first - 1]) if len(times) > first else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--one-threads", type=int, default=None,
                    help="CPU threads of the one process (default: --procs, all the cores the ranks use; 1 compares "
                         "the per-process rate, and the sets are then byte-identical)")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's (64 px for the tiny one)")
    ap.add_argument("--model", type=Path, default=None, help="default: a tiny model made here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gen-ranks-"))
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1780000000"}
    model = args.model
    if model is None:
        model = tmp / "tiny"
        subprocess.run([sys.executable, "-m", "synthcxr", "model", "make-tiny", str(model)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    common = ["generate", "--model", str(model), "--prompt", "a chest x-ray", "-n", str(args.n), "--steps",
              str(args.steps), "--batch-size", str(args.batch), "--device", "cpu"]
    if args.resolution:
        common += ["--resolution", str(args.resolution)]
    one_env = {**env, "OMP_NUM_THREADS": str(args.one_threads or args.procs)}  # by default every core
    t_one = _run([sys.executable, "-m", "synthcxr", *common, "--out", str(tmp / "one")], one_env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    many_env = {**env, "OMP_NUM_THREADS": "1"}  # one core per process
    t_many = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "synthcxr", *common,
                   "--out", str(tmp / "many")], many_env)
    same = all((tmp / "one" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "many").glob("0*.png"))
    print(json.dumps({"n": args.n, "steps": args.steps, "procs": args.procs, "one_threads": args.one_threads or args.procs, "one_s": round(t_one, 2),
                      "many_s": round(t_many, 2), "one_img_s": round(args.n / t_one, 3),
                      "many_img_s": round(args.n / t_many, 3), "speedup": round(t_one / t_many, 2),
                      "byte_identical": same, "note": "wall time including process start and model load",
                      "loop_one_img_s": round(_loop_rate(tmp / "one", args.batch), 3),
                      "loop_many_img_s": round(_loop_rate(tmp / "many", args.batch * args.procs), 3),
                      "loop_speedup": round(_loop_rate(tmp / "many", args.batch * args.procs)
                                            / _loop_rate(tmp / "one", args.batch), 2),
                      "loop_note": "generation loop only, from file write times after each process's first batch"}))


if __name__ == "__main__":
    main()
