"""`evaluate --metrics reid`: does a synthetic image show one of the generator's training *patients*?

For each synthetic image: its `candidates` nearest training images by the re-ID network's own
embedding (cosine), then the verification network's score P(same patient) for each; the image's
re-ID score is the highest. Reported: mean, median, max, and the number and fraction of images
above the threshold that `privacy train-reid` calibrated on held-out real different-patient pairs
(searched the same way, at a 1% false-match rate by default), plus the top pairs side by side.
Unlike the near-copy check (memorization), this flags a synthetic image that is *another image of
a training patient* (Packhäuser et al. 2022), not only a copy of a training file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from synthcxr.config import StrictModel
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)


class ReidEvalConfig(StrictModel):
    """Patient re-identification check of synthetic images."""

    weights: Path | None = None
    """The network saved by `synthcxr privacy train-reid` (its reid.pt, or the folder holding it)."""
    candidates: int | None = Field(None, ge=1)
    """Training images scored per synthetic image (default: as many as the threshold was calibrated with)."""
    threshold: float | None = Field(None, ge=0, le=1)
    """A fixed re-ID score threshold instead of the network's calibrated one."""
    top_pairs: int = Field(8, ge=0)
    """Highest-scoring (synthetic, training) pairs saved side by side."""
    pairs_dir: Path | None = None
    """Where the pair PNGs go (default: `<out stem>_reid_pairs/` beside the JSON)."""
    batch_size: int = Field(64, ge=1)


def _embed_paths(model, paths: list[Path], images, batch_size: int) -> np.ndarray:  # noqa: ANN001
    """Embeddings of image files, a batch at a time (a 100k training set never sits in memory as pixels)."""
    from synthcxr.evaluate.images import load_gray_stack
    from synthcxr.logging_utils import progress_bar

    size = model.cfg.image_size
    out = []
    with progress_bar(len(paths), "re-ID embeddings") as (progress, task):
        for start in range(0, len(paths), 256):
            chunk = paths[start:start + 256]
            out.append(model.embed(load_gray_stack(chunk, size, images), batch_size))
            progress.advance(task, len(chunk))
    return np.concatenate(out) if out else np.zeros((0, model.net.head.in_features), np.float32)


def reid_check(fake_paths: list[Path], train_paths: list[Path], cfg: ReidEvalConfig, *, device: str = "cpu",
               pairs_dir: Path | None = None, images=None) -> tuple[dict[str, Any], list[str]]:  # noqa: ANN001
    """Re-ID scores of synthetic images against the training images; (results, warnings)."""
    from synthcxr.evaluate.memorization import save_pair
    from synthcxr.privacy.reid import load_reid, search_scores

    warnings: list[str] = []
    model = load_reid(cfg.weights, device)  # type: ignore[arg-type]
    cal = model.calibration
    k = cfg.candidates or int(cal.get("candidates", 10))
    fake = _embed_paths(model, fake_paths, images, cfg.batch_size)
    train = _embed_paths(model, train_paths, images, cfg.batch_size)
    scores, idx = search_scores(model, fake, train, k)
    best, nearest = scores[:, 0], idx[:, 0]
    if cfg.threshold is not None:
        threshold, rule = float(cfg.threshold), f"fixed threshold {cfg.threshold} (reid.threshold)"
    else:
        threshold, rule = float(cal["search_threshold"]), cal["rule"]
        if k != cal.get("candidates"):
            warnings.append(f"re-ID: {k} candidates per image but the threshold was calibrated with {cal.get('candidates')}: "
                            "the false-match rate differs from the stated one")
        if cal.get("small_sample"):
            warnings.append(f"re-ID threshold from only {cal.get('n_search_images')} held-out images: below the size a "
                            f"{cal.get('fmr', 0.01):.0%} false-match quantile needs (train the network on more patients)")
    above = best > threshold
    order = np.argsort(-best)
    top = []
    for rank, i in enumerate(order[:cfg.top_pairs]):
        entry = {"synthetic": str(fake_paths[i]), "train": str(train_paths[nearest[i]]), "score": float(best[i]),
                 "above_threshold": bool(above[i])}
        if pairs_dir is not None:
            entry["image"] = str(save_pair(fake_paths[i], train_paths[nearest[i]], Path(pairs_dir) / f"reid_{rank:02d}.png",
                                           images=images))
        top.append(entry)
    results = {
        "n_synthetic": len(fake_paths), "n_train": len(train_paths), "candidates": k,
        "network": {"weights": str(cfg.weights), "backbone": model.cfg.backbone, "image_size": model.cfg.image_size},
        "score": {"mean": float(best.mean()), "median": float(np.median(best)), "p95": float(np.quantile(best, 0.95)),
                  "max": float(best.max())} if len(best) else None,
        "threshold": threshold, "threshold_rule": rule, "fmr": cal.get("fmr"),
        "n_above": int(above.sum()), "fraction_above": float(above.mean()) if len(above) else 0.0,
        "top_pairs": top,
    }
    return results, warnings
