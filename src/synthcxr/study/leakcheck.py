"""Leak check: can simple properties of the blinded files tell real images from a model's?

Readers should judge anatomy and texture, not artefacts of how a file was made. An enlarged small
image is blurrier and compresses better; padded training leaves dark bars; a model may shift the
overall brightness. For each model, every feature below is compared between the real group and
that model's blinded files by the area under the ROC curve (AUC, either direction: 0.5 = the
feature does not separate them, 1.0 = it separates them perfectly). Above `LEAK_AUC_WARN` the
study warns: a reader (or their browser) may tell the groups apart without looking at anatomy.
With few images per group the AUC is noisy (for 8 vs 8 real images split at random, the largest
of the five AUCs exceeds 0.75 in about a third of splits), so each model also gets a permutation
p-value: how often randomly relabelled images separate at least as well. A warning with a small p
is a real difference; with a large p it may be chance.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image as PILImage

LEAK_AUC_WARN = 0.75
FEATURES = ("recompressed_bytes", "laplacian_var", "mean", "std", "border_mean")
"""PNG size after re-compression (zlib level 6), variance of the 4-neighbour Laplacian (sharpness),
mean and standard deviation of the grey levels, mean of the outer 5% ring (border darkness)."""


def features(png: bytes) -> dict[str, float]:
    """The `FEATURES` of one blinded file."""
    with PILImage.open(io.BytesIO(png)) as img:
        img.load()
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=6)
        arr = np.asarray(img, dtype=np.float64)
    lap = arr[:-2, 1:-1] + arr[2:, 1:-1] + arr[1:-1, :-2] + arr[1:-1, 2:] - 4 * arr[1:-1, 1:-1]
    ring = max(1, round(0.05 * min(arr.shape)))
    border = np.ones(arr.shape, bool)
    border[ring:-ring, ring:-ring] = False
    return {"recompressed_bytes": float(len(buf.getvalue())), "laplacian_var": float(lap.var()),
            "mean": float(arr.mean()), "std": float(arr.std()), "border_mean": float(arr[border].mean())}


def auc(a: Sequence[float], b: Sequence[float]) -> float:
    """Separation of two samples: max(AUC, 1 - AUC), AUC being the study's Mann-Whitney AUC (either direction
    of a feature gives readers away)."""
    from synthcxr.study.analysis import auc as mann_whitney_auc

    value = mann_whitney_auc(a, b)
    return float(max(value, 1 - value))


def leak_check(by_group: Mapping[str, Sequence[Mapping[str, float]]], real: str = "real") -> dict[str, Any]:
    """AUC of every feature for `real` vs each other group, and the largest per group."""
    out: dict[str, Any] = {"threshold": LEAK_AUC_WARN, "features": list(FEATURES), "models": {}}
    reals = by_group.get(real, [])
    if len(reals) < 2:
        out["skipped"] = "fewer than 2 real images: nothing to compare the models with"
        return out
    for group, rows in sorted(by_group.items()):
        if group == real:
            continue
        if len(rows) < 2:
            out["models"][group] = {"n_real": len(reals), "n_model": len(rows), "auc": {}, "max_auc": None,
                                    "max_feature": None}
            continue
        aucs = {f: round(auc([r[f] for r in reals], [r[f] for r in rows]), 4) for f in FEATURES}
        worst = max(aucs, key=aucs.get)
        out["models"][group] = {"n_real": len(reals), "n_model": len(rows), "auc": aucs,
                                "max_auc": aucs[worst], "max_feature": worst,
                                "p_value": round(_permutation_p(reals, rows, aucs[worst]), 4)}
    return out


def _permutation_p(reals: Sequence[Mapping[str, float]], rows: Sequence[Mapping[str, float]], observed: float,
                   n_perm: int = 999, seed: int = 0) -> float:
    """P(max AUC over the features >= observed) when real/model labels are shuffled (add-one rule)."""
    from scipy.stats import rankdata

    values = np.array([[r[f] for f in FEATURES] for r in [*reals, *rows]], dtype=float)
    ranks = rankdata(values, axis=0)  # ranks do not change under relabelling, only which rows count
    n_a, n_b = len(reals), len(rows)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        pick = rng.permutation(n_a + n_b)[:n_a]
        u = ranks[pick].sum(axis=0) - n_a * (n_a + 1) / 2
        value = u / (n_a * n_b)
        hits += np.maximum(value, 1 - value).max() >= observed - 1e-9
    return (hits + 1) / (n_perm + 1)


def warnings_for(check: Mapping[str, Any]) -> list[str]:
    """One sentence per model whose files are separable from the real ones above the threshold."""
    out = []
    for group, res in check.get("models", {}).items():
        if res["max_auc"] is not None and res["max_auc"] > check["threshold"]:
            chance = (f"; with {res['n_real']} real vs {res['n_model']} images this may be chance"
                      if res["p_value"] >= 0.05 else "")
            out.append(f"leak check: {res['max_feature']} separates real images from model {group!r} with AUC "
                       f"{res['max_auc']:.2f} (> {check['threshold']}; permutation p = {res['p_value']:.3f}{chance}); "
                       "readers may tell them apart by file properties rather than anatomy (match image sizes and "
                       "framing, e.g. generate at the study size and do not train with data.resize: pad)")
    return out
