"""Diversity: mean MS-SSIM over random pairs within a set (higher = more alike = less diverse).

A generator that collapses onto a few modes shows a synthetic MS-SSIM above the real set's.
MS-SSIM is torchmetrics' `multiscale_structural_similarity_index_measure` on grayscale images in
[0, 1]. The standard setting (5 scales, 11 px Gaussian window, sigma 1.5) needs images of at least
~176 px; for smaller images `msssim_setting` keeps the 11 px window and drops the coarsest scales
until each scale's image is at least as large as the window (then shrinks the window if even one
scale does not fit), and renormalises the remaining scale weights to sum to one. The setting used is
reported with the numbers, since values from different settings are not comparable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from synthcxr.errors import EvaluationError

DEFAULT_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def msssim_setting(size: int) -> dict[str, Any]:
    """Largest number of scales (then largest window) that fits `size` x `size` images."""
    for kernel in (11, 9, 7, 5, 3):
        for scales in range(5, 0, -1):
            coarsest = size // 2 ** (scales - 1)
            # torchmetrics' own checks, plus: the window fits the coarsest scale
            if size >= 2 ** scales and size // max(1, scales - 1) ** 2 > kernel - 1 and coarsest >= kernel:
                betas = np.array(DEFAULT_BETAS[:scales])
                betas = betas / betas.sum()
                return {"scales": scales, "kernel_size": kernel, "sigma": 1.5 * kernel / 11,
                        "betas": [float(b) for b in betas]}
    raise EvaluationError(f"images of {size} px are too small for MS-SSIM", fix="use diversity.image_size >= 8")


def msssim_pairs(a: np.ndarray, b: np.ndarray, setting: dict[str, Any], batch_size: int = 64) -> np.ndarray:
    """MS-SSIM of a[i] vs b[i] for stacks of N x H x W float images in [0, 1]."""
    import torch
    from torchmetrics.functional.image.ssim import multiscale_structural_similarity_index_measure as ms_ssim

    out = []
    for start in range(0, len(a), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(a[start:start + batch_size]))[:, None].float()
        y = torch.from_numpy(np.ascontiguousarray(b[start:start + batch_size]))[:, None].float()
        vals = ms_ssim(x, y, data_range=1.0, kernel_size=setting["kernel_size"], sigma=setting["sigma"],
                       betas=tuple(setting["betas"]), reduction="none", normalize="relu")
        out.append(vals.reshape(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def random_pairs(n: int, n_pairs: int, seed: int) -> np.ndarray:
    """Up to `n_pairs` distinct unordered pairs (i != j), seeded; all pairs when there are fewer."""
    total = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if total <= n_pairs:
        return np.array([(i, j) for i in range(n) for j in range(i + 1, n)], dtype=np.int64).reshape(-1, 2)
    seen: set[tuple[int, int]] = set()
    while len(seen) < n_pairs:
        i, j = rng.integers(0, n, 2)
        if i != j:
            seen.add((int(min(i, j)), int(max(i, j))))
    return np.array(sorted(seen), dtype=np.int64)


def within_set_msssim(images: np.ndarray, n_pairs: int = 200, seed: int = 0, n_boot: int = 200,
                      level: float = 0.95, role: str = "set") -> dict[str, Any]:
    """Mean MS-SSIM over random pairs of one set, with a bootstrap CI over pairs."""
    if len(images) < 2:
        raise EvaluationError(f"MS-SSIM diversity needs at least 2 {role} images, got {len(images)}",
                              fix=f"add {role} images or leave diversity out of `metrics`")
    setting = msssim_setting(min(images.shape[1:]))
    pairs = random_pairs(len(images), n_pairs, seed)
    vals = msssim_pairs(images[pairs[:, 0]], images[pairs[:, 1]], setting)
    rng = np.random.default_rng(seed)
    boots = [vals[rng.integers(0, len(vals), len(vals))].mean() for _ in range(n_boot)]
    alpha = (1 - level) / 2
    return {"mean": float(vals.mean()), "std": float(vals.std()), "n_pairs": int(len(vals)),
            "ci": [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))], **setting}
