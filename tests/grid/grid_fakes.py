"""Fake stage functions that write outputs in the real stages' shapes and log every call.

Calls are appended to a JSONL file (not kept in memory) so calls made inside submitit's worker
processes are counted too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from synthcxr.errors import SynthCXRError
from synthcxr.fileio import append_jsonl, atomic_write_json, read_jsonl


@dataclass
class FakeStages:
    calls_file: Path
    fail: set[str] = field(default_factory=set)
    """Run names whose training raises."""
    crash_once: set[str] = field(default_factory=set)
    """Run names whose first training attempt dies after writing a checkpoint (like a kill)."""
    n_images: int = 4
    interrupt_once: set[str] = field(default_factory=set)
    """Run names whose first training attempt is stopped by a signal (the engine's TrainingInterrupted)."""

    def _log(self, stage: str, **info: Any) -> None:
        append_jsonl(self.calls_file, {"stage": stage, **{k: str(v) if isinstance(v, Path) else v for k, v in info.items()}})

    def calls(self, stage: str | None = None) -> list[dict[str, Any]]:
        return [c for c in read_jsonl(self.calls_file) if stage is None or c["stage"] == stage]

    # train(config, out_dir, resume) -> run dir
    def train(self, config: dict[str, Any], out_dir: Path, resume: bool) -> Path:
        name = Path(out_dir).parent.name
        self._log("train", run=name, resume=resume, lr=config["optimizer"]["lr"])
        if name in self.fail:
            raise RuntimeError(f"simulated training failure in {name}")
        out = Path(out_dir)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config))
        if name in self.interrupt_once and not resume:
            (out / "checkpoints" / "step-000001").mkdir(exist_ok=True)
            raise TrainingInterrupted("stopped by SIGTERM at step 1 of 20")
        if name in self.crash_once and not resume:
            (out / "checkpoints" / "step-000002").mkdir(exist_ok=True)
            raise KeyboardInterruptLike("killed at step 2")
        seed = sum(map(ord, name))
        rng = np.random.default_rng(seed)
        for step in range(1, 21):
            append_jsonl(out / "metrics.jsonl", {"step": step, "loss": float(1.0 / step + 0.05 * rng.random()), "lr": 1e-4})
            if step % 10 == 0:
                append_jsonl(out / "metrics.jsonl", {"step": step, "val_loss": float(0.5 / step + 0.1)})
        atomic_write_json(out / "summary.json", {"train_seconds": 12.5, "images_per_second": 3.2,
                                                  "peak_memory_mb": 512.0, "trainable_params": 12345})
        (out / "synthcxr_model.json").write_text(json.dumps({"base_model": "tiny", "pipeline": None, "lora": None}))
        (out / "DONE").write_text("ok\n")
        return out

    # generate(settings, model, out_dir) -> images dir
    def generate(self, settings: dict[str, Any], model: str, out_dir: Path) -> Path:
        self._log("generate", model=model, out=out_dir)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        n = int(settings.get("n", self.n_images))
        base = sum(map(ord, str(model))) % 200
        for i in range(n):
            file = f"{i:05d}.png"
            rng = np.random.default_rng(settings.get("seed", 0) + i)
            arr = (rng.random((32, 32)) * 55 + base).astype(np.uint8)
            Image.fromarray(arr).save(out / file)
            append_jsonl(out / "manifest.jsonl", {"file": file, "prompt": settings.get("prompt", "a chest x-ray"),
                                                  "seed": settings.get("seed", 0) + i, "model": model})
        return out

    # evaluate(settings, images_dir, out_json, train_config) -> dict
    def evaluate(self, settings: dict[str, Any], images_dir: Path, out_json: Path,
                 train_config: dict[str, Any] | None) -> dict[str, Any]:
        name = Path(out_json).parent.name
        self._log("evaluate", run=name, images=images_dir)
        score = float(sum(map(ord, name)) % 50 + 10)
        files = sorted(Path(images_dir).glob("*.png"))
        pair = {"synthetic": str(files[0]), "nearest_by_feature": str(files[-1]), "feature_cosine": 0.97,
                "nearest_by_ssim": str(files[-1]), "ssim": 0.91, "flagged": True}
        result = {  # the shape `synthcxr evaluate` writes
            "config": {"real": "data/x"},
            "fidelity": {
                "n_real": 8, "n_fake": len(files), "feature_dim": 64,
                "fid": {"value": score, "ci": [score - 2, score + 3], "method": "svd"},
                "kid": {"mean": score / 1000, "std": 0.001, "ci": [score / 1000 - 0.002, score / 1000 + 0.002]},
                "precision": {"value": 0.5, "ci": [0.4, 0.6]},
                "recall": {"value": 0.25 + score / 1000, "ci": [0.2, 0.4]},
            },
            "diversity": {"synthetic": {"mean": 0.3, "std": 0.1, "ci": [0.25, 0.35]},
                          "real": {"mean": 0.2, "std": 0.1, "ci": [0.15, 0.25]}, "synthetic_minus_real": 0.1},
            "memorization": {"ssim": {"mean": 0.5, "max": 0.91}, "feature_cosine": {"mean": 0.8, "max": 0.97},
                             "n_flagged": 1, "flagged_fraction": 1 / len(files), "top_pairs": [pair]},
            "utility": {"real": {"auc": 0.7, "ci": [0.6, 0.8]}, "conditioning": {"label": {"overall": 0.75, "n": 4}}},
            "warnings": [], "timings_s": {"total": 1.0},
        }
        atomic_write_json(out_json, result)
        return result

    def study(self, request: Any) -> dict[str, Any]:
        self._log("study", models=sorted(request.models))
        groups = [{"group": "real", "realism_mean": 4.0, "realism_ci": [3.5, 4.4], "judged_real_fraction": 0.8,
                   "judged_real_ci": [0.6, 0.9], "n_images": 4}]
        groups += [{"group": name, "realism_mean": 2.5 + 0.1 * i, "realism_ci": [2.0, 3.0], "judged_real_fraction": 0.3,
                    "judged_real_ci": [0.1, 0.5], "n_images": 4} for i, name in enumerate(sorted(request.models))]
        return {"n_answers": 24, "groups": groups}


class TrainingInterrupted(SynthCXRError):
    """Same name as the training engine's signal-stop error, which the grid recognises by name."""


class KeyboardInterruptLike(RuntimeError):
    """Stands in for a run killed mid-training (a real kill leaves the same files behind)."""
