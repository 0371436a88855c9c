"""Small generated image sets for evaluation tests (no real data, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_images(root: Path, n: int, *, size: int | tuple[int, int] = 64, shift: float = 0.0, seed: int = 0,
                layout: str = "folder", mode: str = "L") -> Path:
    """`n` smooth grayscale 'X-ray-like' images; even i normal, odd i tuberculosis (a bright patch).

    layout: `folder` (flat), `labelled` (normal/ and tuberculosis/ subfolders), `generation`
    (flat + manifest.jsonl with label and sex, as `synthcxr generate` writes).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    rows = []
    for i in range(n):
        label = "tuberculosis" if i % 2 else "normal"
        yy, xx = np.mgrid[:h, :w]
        img = 110 + 50 * np.sin(xx / (5 + rng.uniform(0, 6)) + yy / (9 + rng.uniform(0, 6))) + rng.normal(0, 12, (h, w)) + shift
        if label == "tuberculosis":
            img[h // 4: h // 2, w // 5: w // 2] += 70
        arr = np.clip(img, 0, 255).astype(np.uint8)
        folder = root / label if layout == "labelled" else root
        folder.mkdir(exist_ok=True)
        path = folder / f"img_{seed}_{i:03d}.png"
        Image.fromarray(arr).convert(mode).save(path)
        rows.append({"file": path.name, "label": label, "sex": "male" if i % 4 < 2 else "female", "seed": i})
    if layout == "generation":
        (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture()
def image_sets(tmp_path: Path) -> dict[str, Path]:
    """Real (labelled subfolders), synthetic (generation folder), and a separate real test set."""
    return {
        "real": make_images(tmp_path / "real", 16, seed=1, layout="labelled"),
        "fake": make_images(tmp_path / "fake", 14, seed=2, shift=10, layout="generation"),
        "test": make_images(tmp_path / "test", 8, seed=3, layout="labelled"),
    }


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch) -> None:
    """Feature caches never leak between tests or into the user's home."""
    monkeypatch.setenv("SYNTHCXR_CACHE_DIR", str(tmp_path / "cache"))
