"""Fidelity in more than one feature space, and CMMD.

Inception FID is no longer the best yardstick alone: FD on DINOv2 features tracks human judgement
better (Stein et al. 2023), RAD-DINO is a chest X-ray feature space, and CMMD (CLIP embeddings,
Gaussian-kernel MMD) has no bias at small sets (Jayasumana et al. 2024). `evaluate` computes the
usual FID/KID/PRDC table for its main `extractor`, one more table per entry of `extractors`, and
CMMD with `cmmd.extractor` (CLIP ViT-L/14-336 by default). Each table names its extractor, and a
number from one feature space is never compared with a number from another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from synthcxr.config import StrictModel
from synthcxr.evaluate.features import ExtractorConfig
from synthcxr.evaluate.fidelity import CMMD_SCALE, CMMD_SIGMA
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)


class CMMDConfig(StrictModel):
    """CMMD (Jayasumana et al. 2024) as google-research/cmmd computes it."""

    extractor: ExtractorConfig = Field(default_factory=lambda: ExtractorConfig(name="clip"))
    """CLIP image embeddings (ViT-L/14 at 336 px as the reference; `--set cmmd.extractor.weights=DIR`)."""
    sigma: float = Field(CMMD_SIGMA, gt=0)
    scale: float = Field(CMMD_SCALE, gt=0)
    ci_groups: int = Field(20, ge=0)
    """Jackknife groups per set for the interval (0 = none)."""


def set_features(ext_cfg: ExtractorConfig, sets: dict[str, Any], roles: list[str], *, cache_dir: Path, cache: bool,
                 on_error: str, images=None) -> tuple[Any, dict[str, Any], list[str]]:  # noqa: ANN001
    """(extractor, role -> features, warnings) for the image sets named in `roles`, through the feature cache."""
    from synthcxr.evaluate.features import FeatureCache, build_extractor, extract_features

    warnings: list[str] = []
    extractor = build_extractor(ext_cfg, cache_dir)
    if extractor.weights_warning:
        log.warning(extractor.weights_warning)
        warnings.append(extractor.weights_warning)
    store = FeatureCache(cache_dir / "features.sqlite") if cache else None
    feats: dict[str, Any] = {}
    try:
        for role in roles:
            res = extract_features(sets[role].paths, extractor, store, batch_size=ext_cfg.batch_size, on_error=on_error,
                                   description=f"{role} features", images=images, num_workers=ext_cfg.num_workers)
            if res.problems:
                warnings.append(f"{role} ({extractor.name}): left out {len(res.problems)} unreadable image(s)")
            feats[role] = res.features
    finally:
        if store is not None:
            store.close()
    return extractor, feats, warnings


def extra_fidelity(extractors: list[ExtractorConfig], sets: dict[str, Any], fidelity_kwargs: dict[str, Any], *,
                   cache_dir: Path, cache: bool, on_error: str, images=None) -> tuple[list[dict[str, Any]], list[str]]:  # noqa: ANN001
    """One FID/KID/PRDC result per extra extractor, each carrying the extractor's description."""
    from synthcxr.evaluate.fidelity import fidelity_metrics

    tables, warnings = [], []
    for ext_cfg in extractors:
        extractor, feats, warn = set_features(ext_cfg, sets, ["real", "fake"], cache_dir=cache_dir, cache=cache,
                                              on_error=on_error, images=images)
        result, more = fidelity_metrics(feats["real"], feats["fake"], **fidelity_kwargs)
        tables.append({"extractor": extractor.describe(), "extractor_pretrained": extractor.pretrained, **result})
        warnings += warn + [f"{extractor.name}: {w}" for w in more]
    return tables, warnings


def cmmd_check(cfg: CMMDConfig, sets: dict[str, Any], *, cache_dir: Path, cache: bool, on_error: str, level: float = 0.95,
               seed: int = 0, images=None) -> tuple[dict[str, Any], list[str]]:  # noqa: ANN001
    """CMMD between the real and synthetic sets in `cfg.extractor`'s embedding space."""
    from synthcxr.evaluate.fidelity import cmmd_metric

    extractor, feats, warnings = set_features(cfg.extractor, sets, ["real", "fake"], cache_dir=cache_dir, cache=cache,
                                              on_error=on_error, images=images)
    result = cmmd_metric(feats["real"], feats["fake"], sigma=cfg.sigma, scale=cfg.scale, ci_groups=cfg.ci_groups,
                         level=level, seed=seed)
    return {"extractor": extractor.describe(), "extractor_pretrained": extractor.pretrained, **result}, warnings
