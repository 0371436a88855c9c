"""Checkpoints that hold everything a resume needs, written so a crash never leaves a broken one.

A checkpoint is a folder `checkpoints/step_00000100/` with
  trainable.safetensors   the trainable weights only (LoRA adapters, or the whole UNet / text encoder),
  state.pt                optimizer, LR schedule, EMA, grad scaler, step, epoch, config hash,
  rng_<rank>.pt           python / numpy / torch CPU / CUDA RNG states of each process,
  meta.json               step, epoch, time (human-readable).
It is written into `.tmp-step_...` and renamed into place only when complete: `rename` is atomic,
so a kill at any moment leaves either the old set of checkpoints or the new one, never a torn one.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from synthcxr.errors import TrainingError
from synthcxr.fileio import atomic_write_bytes, atomic_write_json
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_partial(root: Path) -> None:
    """Delete temporary folders left by a write that was killed (they are ours and incomplete)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{step_dir_name(step)}"


def write_rng(tmp: Path, rank: int) -> None:
    """Every process writes its own RNG state into the checkpoint being assembled."""
    atomic_write_bytes(tmp / f"rng_{rank}.pt", _torch_bytes(rng_state()))


def save_checkpoint(root: Path, step: int, trainable: dict[str, Any], state: dict[str, Any], keep: int,
                    *, meta: dict[str, Any]) -> Path:
    """Write the main process's part into the temporary folder, then rename it into place.

    The caller makes sure other processes have written their RNG files (`write_rng`) first.
    """
    from safetensors.torch import save_file

    final = root / step_dir_name(step)
    if final.exists():
        return final
    tmp = tmp_dir_for(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in trainable.items()}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    atomic_write_bytes(tmp / "state.pt", _torch_bytes(state))
    atomic_write_json(tmp / "meta.json", {**meta, "step": step, "saved_at": time.time()})
    for f in tmp.iterdir():  # data on disk before the rename makes the folder visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (older ones are superseded; the newest is never removed)."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(trainable tensors, state, this process's RNG state or None)."""
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # a checkpoint damaged after it was written (disk error, manual edits)
        raise TrainingError(f"checkpoint cannot be read: {exc}", file=path,
                            fix="move this checkpoint folder away; --resume then uses the one before it") from exc
    rng_file = path / f"rng_{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.exists() else None
    return tensors, state, rng
