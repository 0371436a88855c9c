"""Memorization (privacy) check: does any synthetic image copy a training patient?

For every synthetic image we find its nearest training image twice:
- by cosine similarity of extractor features centred on the training-set mean (semantic near-copies,
  robust to small shifts), and
- by SSIM on grayscale pixels (near pixel copies). Exhaustive SSIM over all pairs costs
  N_fake x N_train full-image comparisons, so by default SSIM is computed against the
  `ssim_candidates` nearest training images by feature similarity (0 = against all of them).
The report gives both distributions, flags pairs above the thresholds, and saves the most similar
pairs side by side (synthetic left, training right) for a human to judge.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from synthcxr.errors import EvaluationError
from synthcxr.evaluate.imagecache import DecodedImageCache
from synthcxr.evaluate.images import load_gray, load_gray_stack
from synthcxr.fileio import atomic_write_bytes


def cosine_matrix(a: np.ndarray, b: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of rows of a and b, optionally after subtracting `center` from both."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if center is not None:
        a, b = a - center, b - center
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return a @ b.T


def ssim_many(x: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """SSIM of one H x W image (H, W >= 16) against K x H x W candidates (torchmetrics, 11 px Gaussian window)."""
    import torch
    from torchmetrics.functional.image.ssim import structural_similarity_index_measure as ssim

    xs = torch.from_numpy(np.repeat(x[None, None], len(candidates), axis=0)).float()
    ys = torch.from_numpy(np.ascontiguousarray(candidates[:, None])).float()
    return ssim(xs, ys, data_range=1.0, kernel_size=11, reduction="none").reshape(-1).numpy()


def _summary(values: np.ndarray) -> dict[str, Any]:
    hist, edges = np.histogram(values, bins=10, range=(min(0.0, float(values.min())), 1.0))
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p95": float(np.quantile(values, 0.95)),
            "max": float(values.max()), "histogram": {"counts": hist.tolist(), "edges": [float(e) for e in edges]}}


def save_pair(synthetic: Path, train: Path, out: Path, size: int = 256, images: DecodedImageCache | None = None) -> Path:
    """Synthetic | training side by side as one PNG (grayscale, same size, 8 px gap)."""
    left = (load_gray(synthetic, size, images) * 255).round().astype(np.uint8)
    right = (load_gray(train, size, images) * 255).round().astype(np.uint8)
    canvas = np.full((size, 2 * size + 8), 255, dtype=np.uint8)
    canvas[:, :size] = left
    canvas[:, size + 8:] = right
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return atomic_write_bytes(out, buf.getvalue())


def memorization_check(fake_feats: np.ndarray, train_feats: np.ndarray, fake_paths: list[Path], train_paths: list[Path],
                       *, ssim_size: int = 128, ssim_candidates: int = 20, feature_threshold: float = 0.95,
                       ssim_threshold: float = 0.9, top_pairs: int = 8, pairs_dir: Path | None = None,
                       images: DecodedImageCache | None = None) -> dict[str, Any]:
    """Nearest training image per synthetic image by features and by SSIM; flags and saved top pairs.

    `images` is the run's decoded-image cache (files already decoded for features are not decoded again).
    """
    if len(fake_feats) == 0 or len(train_feats) == 0:
        raise EvaluationError("memorization needs at least one synthetic and one training image")
    # 1. feature nearest neighbours
    # centred on the training mean: every chest X-ray shares a large common feature component that
    # would otherwise make all pairs look alike (raw cosines of non-negative pooled features are ~0.9)
    center = np.asarray(train_feats, np.float64).mean(axis=0) if len(train_feats) > 1 else None
    cos = cosine_matrix(fake_feats, train_feats, center)
    nn_feat = cos.argmax(axis=1)
    sim_feat = cos[np.arange(len(cos)), nn_feat]

    # 2. SSIM nearest neighbours among the feature candidates (or all training images)
    fake_px = load_gray_stack(fake_paths, ssim_size, images)
    train_px = load_gray_stack(train_paths, ssim_size, images)
    k = len(train_paths) if ssim_candidates <= 0 else min(ssim_candidates, len(train_paths))
    candidates = np.argsort(-cos, axis=1)[:, :k]
    nn_ssim = np.zeros(len(fake_paths), dtype=np.int64)
    sim_ssim = np.zeros(len(fake_paths))
    for i, cand in enumerate(candidates):
        vals = ssim_many(fake_px[i], train_px[cand])
        best = int(vals.argmax())
        nn_ssim[i], sim_ssim[i] = cand[best], vals[best]

    # 3. flags and the most similar pairs (by SSIM, the pixel-copy signal; ties broken by features)
    pairs = []
    for i in range(len(fake_paths)):
        pairs.append({
            "synthetic": str(fake_paths[i]),
            "nearest_by_feature": str(train_paths[nn_feat[i]]), "feature_cosine": float(sim_feat[i]),
            "nearest_by_ssim": str(train_paths[nn_ssim[i]]), "ssim": float(sim_ssim[i]),
            "flagged": bool(sim_feat[i] >= feature_threshold or sim_ssim[i] >= ssim_threshold),
        })
    order = sorted(range(len(pairs)), key=lambda i: (-pairs[i]["ssim"], -pairs[i]["feature_cosine"]))
    top = [pairs[i] for i in order[:top_pairs]]
    if pairs_dir is not None:
        for rank, pair in enumerate(top, 1):
            name = f"pair_{rank:02d}_ssim{pair['ssim']:.3f}_cos{pair['feature_cosine']:.3f}.png"
            pair["image"] = str(save_pair(Path(pair["synthetic"]), Path(pair["nearest_by_ssim"]), Path(pairs_dir) / name,
                                              images=images))
    flagged = [p for p in pairs if p["flagged"]]
    return {
        "n_synthetic": len(fake_paths), "n_train": len(train_paths),
        "feature_cosine": _summary(sim_feat), "ssim": _summary(sim_ssim),
        "thresholds": {"feature_cosine": feature_threshold, "ssim": ssim_threshold},
        "ssim_size": ssim_size, "ssim_candidates": k,
        "n_flagged": len(flagged), "flagged_fraction": len(flagged) / len(pairs),
        "flagged": flagged[:100], "top_pairs": top,
        "pairs_dir": str(pairs_dir) if pairs_dir is not None else None,
    }
