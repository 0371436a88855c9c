"""Every family resumes bit-identically after a real SIGKILL: a `synthcxr train` process is killed at a
random moment (inside a step, a validation or a checkpoint write), `--resume` finishes it, and its
checkpointed weights, optimizer state, train and validation losses and exported weights equal an
uninterrupted run's exactly."""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from synthcxr.fileio import read_jsonl

# each family with its main method (the public benchmark's recipes), plus SD's full fine-tuning
CASES = [("sd", "lora"), ("sd", "full"), ("sdxl", "lora"), ("sd3", "lora"), ("pixart", "full"), ("sana", "full"),
         ("flux", "lora")]
FAST = {("sdxl", "lora")}  # one case in the quick suite; the others run with the slow ones (CI runs both)
# caches (with flips drawn per step) and bf16 autocast have state of their own on a resume: spread them
# over the cases so that each is resumed by at least one family of each objective
EXTRA = {("sd", "full"): {"train": {"cache_latents": "disk"}},
         ("sdxl", "lora"): {"train": {"cache_latents": "ram", "mixed_precision": "bf16"}, "data": {"hflip": True}},
         ("sd3", "lora"): {"train": {"cache_latents": "disk"}, "data": {"hflip": True}},
         ("sana", "full"): {"train": {"cache_latents": "ram"}},
         ("flux", "lora"): {"train": {"cache_latents": "ram", "mixed_precision": "bf16"}, "data": {"hflip": True}}}

# state to restore: LoRA dropout (global RNG), EMA, warm-up + cosine schedule, accumulation, held-out loss
HARD = {"data": {"split": {"val": 0.25, "test": 0.0}},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "train": {"max_steps": 7, "batch_size": 1, "gradient_accumulation": 2, "ema": True, "ema_decay": 0.9,
                  "validate_every": 2}}


@pytest.fixture
def family_config(tiny_family_model, train_data):
    from train_helpers import tiny_config_dict

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(family: str, method: str):
        from train_helpers import deep_update

        extra = {"dropout": 0.1} if method == "lora" else {}
        sections = deep_update(copy.deepcopy(HARD), {"method": {"name": method, **extra}})
        deep_update(sections, copy.deepcopy(EXTRA.get((family, method), {})))
        return build_config(TrainConfig, tiny_config_dict(tiny_family_model(family), train_data, **sections))

    return make


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a, b, where: str) -> None:
    """Nested state (dicts, lists, tensors, numbers) equal exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _final_safetensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every exported weight file (a LoRA file, or a merged pipeline's modules) by its path."""
    files = sorted((run / "final").rglob("*.safetensors"))
    assert files, f"nothing exported in {run / 'final'}"
    return {str(f.relative_to(run)): _tensors(f) for f in files}


def _rows(run: Path, kind: str) -> list[tuple]:
    key = "loss" if kind == "train" else "val_loss"
    return [(r["step"], r[key]) for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == kind]


def _kill_mid_run(config_file: Path, run: Path, rng: random.Random) -> int:
    """Start `synthcxr train` in a subprocess and SIGKILL it at a random moment after a checkpoint;
    returns the last checkpoint step that existed when it died."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "synthcxr", "train", str(config_file), "--out", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after = rng.randint(2, 4)
    deadline = time.time() + 300

    def wait_for_checkpoint(step: int) -> float:
        while not (run / "checkpoints" / f"step_{step:08d}").exists():
            if proc.poll() is not None:
                raise AssertionError(f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            assert time.time() < deadline, "training made no progress in 300 s"
            time.sleep(0.005)
        return time.time()

    try:
        previous = wait_for_checkpoint(kill_after - 1)
        step_time = wait_for_checkpoint(kill_after) - previous
        # somewhere inside the next step, its validation or its checkpoint write (scaled by the measured
        # step time so the kill lands before the run ends on a fast machine as on a slow one)
        time.sleep(rng.uniform(0.0, 0.9) * step_time)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return kill_after


@pytest.mark.parametrize(("family", "method"), [
    pytest.param(f, m, marks=() if (f, m) in FAST else pytest.mark.slow, id=f"{f}-{m}") for f, m in CASES])
def test_sigkill_then_resume_is_bit_identical(family, method, family_config, tmp_path):
    import yaml

    from synthcxr.train.checkpoint import latest_checkpoint
    from synthcxr.train.loop import train

    cfg = family_config(family, method)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = tmp_path / "run"
    _kill_mid_run(config_file, run, random.Random())
    assert not (run / "DONE").exists()
    train(cfg, run, resume=True)
    reference = train(cfg, tmp_path / "reference")

    for name in ("trainable.safetensors",):
        _same(_tensors(latest_checkpoint(run / "checkpoints") / name),
              _tensors(latest_checkpoint(reference / "checkpoints") / name), name)
    states = [torch.load(latest_checkpoint(r / "checkpoints") / "state.pt", weights_only=False)
              for r in (run, reference)]
    for key in ("step", "optimizer", "lr_scheduler", "ema"):
        _same(states[0][key], states[1][key], key)
    assert _rows(run, "train") == _rows(reference, "train")
    val = _rows(run, "val")
    assert len(val) >= 3 and val == _rows(reference, "val")  # every 2 steps + the final one
    _same(_final_safetensors(run), _final_safetensors(reference), "final")
