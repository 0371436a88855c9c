"""The one place that lays out a run directory; every output of a run lives inside it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from synthcxr.fileio import atomic_write_json, read_jsonl

TRACKED_PACKAGES = (
    "synthcxr", "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate",
    "bitsandbytes", "prodigyopt", "dadaptation", "torchmetrics", "numpy", "pydicom",
)


@dataclass(frozen=True)
class RunDir:
    """Paths inside a run directory. Creating it never deletes anything already there."""

    root: Path

    @classmethod
    def create(cls, root: str | Path) -> RunDir:
        run = cls(Path(root))
        for sub in (run.checkpoints, run.samples, run.logs):
            sub.mkdir(parents=True, exist_ok=True)
        return run

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def final(self) -> Path:
        """Final weights: a diffusers pipeline folder (full/dreambooth) or a LoRA file folder."""
        return self.root / "final"

    @property
    def done_marker(self) -> Path:
        return self.root / "DONE"

    def training_work(self) -> list[str]:
        """What here holds training work: checkpoints, finished steps, final weights, DONE. A run
        directory without any (a start that stopped during setup) may be reused by a corrected command."""
        found = []
        if self.checkpoints.is_dir() and any(self.checkpoints.iterdir()):
            found.append("checkpoints")
        if any(r.get("kind") == "train" for r in read_jsonl(self.metrics)):
            found.append("finished steps in metrics.jsonl")
        return found + [p.name for p in (self.final, self.done_marker) if p.exists()]


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment_info() -> dict:
    """Package versions, git commit and device, so results can be traced to what produced them."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    except Exception:  # noqa: BLE001 - environment capture must never fail a run
        info["device"] = "unknown"
    return info


def write_environment(path: Path) -> Path:
    return atomic_write_json(path, environment_info())


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
