"""Interrupted runs continue exactly: same weights, optimizer, schedule, EMA and RNG as an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from synthcxr.errors import ConfigError, TrainingError
from synthcxr.fileio import read_jsonl

# dropout (global RNG), EMA, warmup + cosine schedule and accumulation all have state to restore
HARD = {"method": {"name": "lora", "dropout": 0.1},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "train": {"max_steps": 4, "batch_size": 1, "gradient_accumulation": 2, "ema": True, "ema_decay": 0.9}}


# The same hard case for every optimizer and adapter that has its own state to restore: schedule-free
# averaged weights (z) and step-size estimates, factored / 8-bit / orthogonalised momenta, adapter
# factors with module dropout. Schedule-free ones run without EMA or a schedule (their average replaces both).
NEW_OPTIMIZERS = ("schedulefree_adamw", "prodigy_schedulefree", "came", "lion", "lion8bit", "adopt", "muon")
VARIANTS = {
    "adamw": {},
    **{name: {"optimizer": {"name": name, "lr": None}} for name in NEW_OPTIMIZERS},
    **{name: {"method": {"name": name}, "optimizer": {"lr": 1e-2}} for name in ("loha", "lokr", "oft")},
}
for _name in ("schedulefree_adamw", "prodigy_schedulefree"):
    VARIANTS[_name].update(schedule={"name": "constant", "warmup_steps": 0}, train={"ema": False})


def _hard(variant: str, **train) -> dict:
    """HARD with the variant's sections merged in (and `train` keys on top)."""
    out = {k: dict(v) for k, v in HARD.items()}
    for section, values in VARIANTS[variant].items():
        out[section] = {**out.get(section, {}), **values}
    out["train"].update(train)
    return out


def _final_weights(run) -> dict:
    """The exported weights: the LoRA file, or the UNet of a merged pipeline."""
    from safetensors.torch import load_file

    lora = run / "final" / "pytorch_lora_weights.safetensors"
    return load_file(str(lora if lora.exists() else run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _train_rows(run):
    return [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "train"]


@pytest.fixture
def reference(make_config, tmp_path):
    from synthcxr.train.loop import train

    return train(make_config(**HARD), tmp_path / "reference")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigterm_checkpoints_and_resume_is_identical(variant, make_config, read_trainable, tmp_path, monkeypatch):
    from synthcxr.train import loop

    cfg = make_config(**_hard(variant))
    reference = loop.train(cfg, tmp_path / "reference")
    original = loop.Session.loss

    def loss_with_signal(self, item):
        if item["step"] == 1 and item["micro"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, item)

    monkeypatch.setattr(loop.Session, "loss", loss_with_signal)
    run = tmp_path / "run"
    with pytest.raises(loop.TrainingInterrupted, match="--resume"):
        loop.train(cfg, run)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001", "step_00000002"]
    monkeypatch.setattr(loop.Session, "loss", original)
    loop.train(cfg, run, resume=True)
    _same_weights(read_trainable(run), read_trainable(reference))
    assert _train_rows(run) == _train_rows(reference)
    _same_weights(_final_weights(run), _final_weights(reference))  # EMA / schedule-free averaged weights


class _Killed(BaseException):
    """Stands in for the process dying (not an Exception: nothing may catch it)."""


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(make_config, reference, read_trainable, tmp_path,
                                                                monkeypatch):
    import safetensors.torch

    from synthcxr.train.checkpoint import latest_checkpoint
    from synthcxr.train.loop import train

    real_save = safetensors.torch.save_file

    def dying_save(tensors, filename, *args, **kwargs):
        if "step_00000003" in str(filename):
            with open(filename, "wb") as fh:  # a torn file, then death
                fh.write(b"\x00" * 10)
            raise _Killed
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    cfg = make_config(**HARD)
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        train(cfg, run)
    assert (run / "checkpoints" / ".tmp-step_00000003").is_dir()
    assert latest_checkpoint(run / "checkpoints").name == "step_00000002"
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    train(cfg, run, resume=True)
    assert not (run / "checkpoints" / ".tmp-step_00000003").exists()
    _same_weights(read_trainable(run), read_trainable(reference))


def test_existing_run_is_never_overwritten(make_config, tmp_path):
    from synthcxr.train.loop import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--resume"):
        train(make_config(), run)
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_with_other_config_is_refused_but_max_steps_may_grow(make_config, read_trainable, tmp_path):
    from synthcxr.train.loop import train

    run = train(make_config(train={"max_steps": 2}), tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        train(make_config(train={"max_steps": 2}, optimizer={"lr": 5e-3}), run, resume=True)
    assert "optimizer.lr" in str(err.value) and "train.max_steps" in str(err.value)
    # finished runs are left alone; a longer max_steps continues from the last checkpoint
    assert train(make_config(train={"max_steps": 2}), run, resume=True) == run
    (run / "DONE").unlink()
    train(make_config(train={"max_steps": 3}), run, resume=True)
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "train"]
    assert steps == [1, 2, 3]
    reference = train(make_config(train={"max_steps": 3}), tmp_path / "ref")
    _same_weights(read_trainable(run), read_trainable(reference))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(make_config, tmp_path, monkeypatch):
    from synthcxr.train import loop

    original = loop.Session.loss
    monkeypatch.setattr(loop.Session, "loss",
                        lambda self, item: original(self, item) * (float("nan") if item["step"] == 2 else 1.0))
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        loop.train(make_config(train={"max_steps": 4}), run)
    msg = str(err.value)
    assert "loss became nan at step 3" in msg and "step_00000002" in msg and "lr" in msg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_oom_message_names_the_settings_to_change(make_config):
    from synthcxr.train.loop import _oom_error

    msg = str(_oom_error(make_config(method={"name": "full"}), RuntimeError("CUDA out of memory")))
    for key in ("train.batch_size", "train.gradient_checkpointing", "train.mixed_precision", "train.cache_latents",
                "method.name=lora"):
        assert key in msg


@pytest.mark.slow
# a real process kill for the base case and for schedule-free averaged weights; the in-process SIGTERM
# test above covers every optimizer and adapter through the same checkpoint/restore path
@pytest.mark.parametrize("variant", ["adamw", "schedulefree_adamw"])
def test_sigkill_at_random_step_then_resume_is_identical(variant, make_config, read_trainable, tmp_path):
    """A real SIGKILL of a training process at a random moment; the resumed run ends bit-identical."""
    import yaml

    from synthcxr.train.loop import train

    cfg = make_config(**_hard(variant, max_steps=8))
    reference = train(cfg, tmp_path / "reference")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "synthcxr", "train", str(config_file), "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random()
    kill_after = rng.randint(2, 5)
    deadline = time.time() + 300

    def wait_for_checkpoint(step: int) -> float:
        while not (run / "checkpoints" / f"step_{step:08d}").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.005)
        return time.time()

    try:
        previous = wait_for_checkpoint(kill_after - 1)
        step_time = wait_for_checkpoint(kill_after) - previous
        # Somewhere inside the next step or its checkpoint write; scaled by the measured step time so
        # the kill lands before the run ends on a fast machine as on a slow one.
        time.sleep(rng.uniform(0.0, 0.9) * step_time)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "DONE").exists()
    train(cfg, run, resume=True)
    _same_weights(read_trainable(run), read_trainable(reference))
    assert _train_rows(run) == _train_rows(reference)
    _same_weights(_final_weights(run), _final_weights(reference))
