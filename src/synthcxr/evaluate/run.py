"""`evaluate(cfg)`: read the image sets, extract (cached) features, run each metric, write one JSON.

Reads top to bottom: 1. image sets  2. features  3. fidelity  4. diversity  5. memorization
6. utility  7. JSON. A metric whose inputs are absent (no training set, no labels) is skipped with the
reason in the results; a metric with too few images raises a clear `EvaluationError`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from synthcxr import __version__
from synthcxr.config import StrictModel
from synthcxr.evaluate.feature_spaces import CMMDConfig
from synthcxr.evaluate.features import ExtractorConfig
from synthcxr.evaluate.memorization import CopySearch
from synthcxr.evaluate.reid import ReidEvalConfig
from synthcxr.evaluate.utility import UtilityConfig
from synthcxr.fileio import atomic_write_json
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

Metric = Literal["fidelity", "diversity", "memorization", "utility", "cmmd", "reid"]
ALL_METRICS: list[Metric] = ["fidelity", "diversity", "memorization", "utility"]


class FidelityConfig(StrictModel):
    fid_method: Literal["svd", "sqrtm"] = "svd"
    """`svd`: exact trace via singular values (fast, stable); `sqrtm`: scipy's matrix square root (reference)."""
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    k: int = Field(5, ge=1)
    """Nearest neighbours for precision/recall/density/coverage (Naeem et al.; CheXGenBench uses 5)."""
    ci_groups: int = Field(20, ge=0)
    """Jackknife groups per set for the confidence intervals (0 = none); see `fidelity.jackknife_intervals`."""
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _renamed_bootstrap(cls, data: Any) -> Any:
        """`bootstrap` (biased percentile intervals, removed) is read as `ci_groups`, with a note to rename it."""
        if isinstance(data, dict) and "bootstrap" in data and "ci_groups" not in data:
            data = {**data}
            data["ci_groups"] = data.pop("bootstrap")
            log.warning("fidelity.bootstrap is now fidelity.ci_groups (jackknife groups per set; %s used): "
                        "rename it in your config", data["ci_groups"])
        return data


class DiversityConfig(StrictModel):
    image_size: int = Field(256, ge=8)
    """Grayscale size for MS-SSIM; 256 px allows the standard 5 scales with an 11 px window."""
    pairs: int = Field(200, ge=1)


class MemorizationConfig(StrictModel):
    """The near-copy check (see evaluate/memorization.py): what it looks through and how it is calibrated."""

    image_size: int = Field(64, ge=16)
    """Comparison size of the copy similarity, px (shifts are counted in these pixels)."""
    max_shift: int = Field(8, ge=0)
    """Largest shift undone, px at image_size (at most image_size / 4)."""
    rotations: list[float] = Field(default_factory=lambda: [-5.0, -2.5, 0.0, 2.5, 5.0])
    """Rotations tried, degrees."""
    scales: list[float] = Field(default_factory=lambda: list(CopySearch().scales))
    """Magnifications tried (0.85-1.18 undoes crops keeping >= 85% and rescales down to 0.85)."""
    mirror: bool = True
    """Also try the horizontal mirror."""
    candidates: int = Field(10, ge=0)
    """Training images compared per image: this many nearest by features plus as many by thumbnails (0 = all)."""
    quantile: float = Field(0.99, gt=0.5, le=1.0)
    """Flag above this quantile of the null (real images not in the training set); 1.0 = above their maximum."""
    holdout: Path | None = None
    """Real images not used in training, for the null. Default: the --real and --test images whose content
    is not in the training set; with fewer than 10 of them, leave-one-out within the training set."""
    null_images: int = Field(1000, ge=10)
    """At most this many null images (a seeded random subset): plenty for a 0.99 quantile, bounded cost."""
    copy_threshold: float | None = None
    """A fixed copy-similarity threshold instead of the calibrated one."""
    feature_threshold: float | None = None
    """A fixed feature-cosine threshold instead of the calibrated one."""
    flag_by_features: bool | None = None
    """Whether feature cosines flag too. Default: only with a pretrained extractor (random weights flag noise)."""
    top_pairs: int = Field(8, ge=0)
    pairs_dir: Path | None = None
    """Where the side-by-side PNGs go (default: `<out stem>_pairs/` beside the JSON)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_ssim_keys(cls, data: Any) -> Any:
        """Keys of the former SSIM check: sizes and candidate counts are read under their new names."""
        if not isinstance(data, dict):
            return data
        data = {**data}
        for old, new in (("ssim_size", "image_size"), ("ssim_candidates", "candidates")):
            if old in data:
                value = data.pop(old)
                data.setdefault(new, value)
                log.warning("memorization.%s is now memorization.%s (%s used): rename it in your config", old, new, value)
        if "ssim_threshold" in data:
            data.pop("ssim_threshold")
            log.warning("memorization.ssim_threshold was removed: thresholds are calibrated on real hold-out images "
                        "now (set memorization.copy_threshold to fix one)")
        return data

    @model_validator(mode="after")
    def _search_fits(self) -> MemorizationConfig:
        if self.max_shift > self.image_size // 4:
            raise ValueError(f"memorization.max_shift={self.max_shift} is more than image_size/4 "
                             f"({self.image_size // 4}): raise memorization.image_size or lower max_shift")
        if not self.rotations or not self.scales or min(self.scales) <= 0:
            raise ValueError("memorization.rotations and memorization.scales need at least one value (scales > 0), "
                             "e.g. rotations: [0] and scales: [1.0] to undo shifts only")
        return self

    def search(self) -> CopySearch:
        return CopySearch(self.image_size, self.max_shift, tuple(self.rotations), tuple(self.scales), self.mirror)


class EvaluateConfig(StrictModel):
    """Everything `synthcxr evaluate` needs; saved inside the results JSON."""

    real: Path
    """Real reference images: a folder (searched recursively), or a Montgomery/Shenzhen data set."""
    fake: Path
    """Synthetic images: a folder, or a `synthcxr generate` folder (its manifest gives labels)."""
    train: Path | None = None
    """The generator's real training images (memorization, classifier training). Default: `real`."""
    test: Path | None = None
    """Real held-out test images for the classifier. Default: a patient-level split of `train`."""
    split: Path | None = None
    """A saved patient-level split of `train` (the generator's `splits.json`, a grid's `split.json`,
    `synthcxr data split`): the classifier trains on its train patients, stops early on its val
    patients and is tested on its test patients, which the generator never saw."""
    out: Path = Path("eval.json")
    metrics: list[Metric] = Field(default_factory=lambda: list(ALL_METRICS))
    extractor: ExtractorConfig = Field(default_factory=ExtractorConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    diversity: DiversityConfig = Field(default_factory=DiversityConfig)
    memorization: MemorizationConfig = Field(default_factory=MemorizationConfig)
    utility: UtilityConfig = Field(default_factory=UtilityConfig)
    extractors: list[ExtractorConfig] = Field(default_factory=list)
    """More feature spaces for FID/KID/PRDC, one table each beside `extractor`'s (e.g. dinov2, raddino)."""
    cmmd: CMMDConfig = Field(default_factory=CMMDConfig)
    """The `cmmd` metric (CLIP embeddings); not in the default metrics: it needs CLIP weights."""
    reid: ReidEvalConfig = Field(default_factory=ReidEvalConfig)
    """The `reid` metric (patient re-identification); needs a network from `synthcxr privacy train-reid`."""
    cache: bool = True
    """Cache features by image content hash, so a re-evaluation computes only new images."""
    cache_dir: Path | None = None
    """Default: $SYNTHCXR_CACHE_DIR or ~/.cache/synthcxr."""
    image_cache_mb: int = Field(1536, ge=0)
    """Memory for decoded images kept during one run, so each file is decoded once for all metrics
    (native-size uint8, least recently used dropped first; 0 = decode again for every metric)."""
    on_error: Literal["fail", "skip"] = "fail"
    """Unreadable images: list them all and stop (fail), or leave them out with a warning (skip)."""
    seed: int = 0

    @field_validator("metrics")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


def read_sets(cfg: EvaluateConfig) -> dict[str, Any]:
    """Role -> image set: real and fake always; train, test and the memorization hold-outs when given."""
    from synthcxr.evaluate.images import read_image_set

    sets = {"real": read_image_set(cfg.real, "real"), "fake": read_image_set(cfg.fake, "fake")}
    if cfg.train is not None:
        sets["train"] = read_image_set(cfg.train, "train")
    if cfg.test is not None:
        sets["test"] = read_image_set(cfg.test, "test")
    if "memorization" in cfg.metrics and cfg.memorization.holdout is not None:
        sets["holdout"] = read_image_set(cfg.memorization.holdout, "holdout")
    return sets


def feature_roles(cfg: EvaluateConfig, sets: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(roles whose `extractor` features fidelity and memorization need, memorization's null roles)."""
    # memorization's null: real images not in the training set (an explicit hold-out set, or --real/--test)
    # (without --train, --real is the training set and cannot be part of it)
    null_roles = ["holdout"] if "holdout" in sets else [
        r for r in ("real", "test") if r in sets and not (r == "real" and cfg.train is None)]
    needs_features = {"fidelity": ["real", "fake"], "memorization": ["fake", "train", *null_roles]}
    return sorted({r for m, rs in needs_features.items() if m in cfg.metrics for r in rs}), null_roles


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the configured metrics and write the results JSON (atomically) to `cfg.out`."""
    from synthcxr.evaluate.diversity import within_set_msssim
    from synthcxr.evaluate.features import FeatureCache, build_extractor, default_cache_dir, extract_features
    from synthcxr.evaluate.fidelity import fidelity_metrics
    from synthcxr.evaluate.imagecache import DecodedImageCache
    from synthcxr.evaluate.images import load_gray_stack
    from synthcxr.evaluate.memorization import holdout_images, memorization_check
    from synthcxr.evaluate.utility import utility_check

    started = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    skipped: dict[str, str] = {}
    images = DecodedImageCache(cfg.image_cache_mb * 2**20) if cfg.image_cache_mb > 0 else None

    # 1. image sets
    sets = read_sets(cfg)
    train_set = sets.get("train", sets["real"])
    if cfg.train is None and ("memorization" in cfg.metrics or "utility" in cfg.metrics):
        warnings.append("no --train set given: memorization and the classifier use the --real images as the training set")

    # 2. features (only what fidelity and memorization need), cached by content hash
    cache_dir = cfg.cache_dir or default_cache_dir()
    roles, null_roles = feature_roles(cfg, sets)
    feats: dict[str, Any] = {}
    hashes: dict[str, list[str]] = {}
    feature_counts: dict[str, dict[str, int]] = {}
    extractor = None
    if roles:
        t0 = time.perf_counter()
        extractor = build_extractor(cfg.extractor, cache_dir)
        if extractor.weights_warning:  # said now, before minutes of features, and kept with the numbers
            log.warning(extractor.weights_warning)
            warnings.append(extractor.weights_warning)
        cache = FeatureCache(cache_dir / "features.sqlite") if cfg.cache else None
        try:
            for role in roles:
                if role == "train" and cfg.train is None and "real" in feats:  # the same images
                    feats["train"], hashes["train"] = feats["real"], hashes["real"]
                    continue
                image_set = train_set if role == "train" else sets[role]
                res = extract_features(image_set.paths, extractor, cache, batch_size=cfg.extractor.batch_size,
                                       on_error=cfg.on_error, description=f"{role} features", images=images,
                                       num_workers=cfg.extractor.num_workers)
                if res.problems:
                    warnings.append(f"{role}: left out {len(res.problems)} unreadable image(s)")
                    image_set.items = [image_set.items[i] for i in res.kept]
                feats[role], hashes[role] = res.features, res.hashes
                feature_counts[role] = {"computed": res.computed, "cached": res.cached}
        finally:
            if cache is not None:
                cache.close()
        timings["features"] = time.perf_counter() - t0

    results: dict[str, Any] = {
        "synthcxr_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"),
        "inputs": {role: s.describe() for role, s in sets.items()},
        "extractor": extractor.describe() if extractor else None,
        "extractor_pretrained": extractor.pretrained if extractor else None,
        "features": feature_counts,
        "cache_dir": str(cache_dir) if cfg.cache else None,
    }

    # 3. fidelity
    if "fidelity" in cfg.metrics:
        t0 = time.perf_counter()
        fc = cfg.fidelity
        results["fidelity"], warn = fidelity_metrics(
            feats["real"], feats["fake"], fid_method=fc.fid_method, kid_subsets=fc.kid_subsets,
            kid_subset_size=fc.kid_subset_size, k=fc.k, ci_groups=fc.ci_groups, level=fc.ci_level, seed=cfg.seed)
        warnings += warn
        timings["fidelity"] = time.perf_counter() - t0

    # 3b. fidelity in more feature spaces, and CMMD (each result names its extractor)
    if "fidelity" in cfg.metrics and cfg.extractors:
        from synthcxr.evaluate.feature_spaces import extra_fidelity

        t0 = time.perf_counter()
        fc = cfg.fidelity
        results["fidelity_by_extractor"], warn = extra_fidelity(
            cfg.extractors, sets, {"fid_method": fc.fid_method, "kid_subsets": fc.kid_subsets, "kid_subset_size":
                                   fc.kid_subset_size, "k": fc.k, "ci_groups": fc.ci_groups, "level": fc.ci_level,
                                   "seed": cfg.seed},
            cache_dir=cache_dir, cache=cfg.cache, on_error=cfg.on_error, images=images)
        warnings += warn
        timings["fidelity_by_extractor"] = time.perf_counter() - t0
    if "cmmd" in cfg.metrics:
        from synthcxr.evaluate.feature_spaces import cmmd_check

        t0 = time.perf_counter()
        results["cmmd"], warn = cmmd_check(cfg.cmmd, sets, cache_dir=cache_dir, cache=cfg.cache, on_error=cfg.on_error,
                                           level=cfg.fidelity.ci_level, seed=cfg.seed, images=images)
        warnings += warn
        timings["cmmd"] = time.perf_counter() - t0

    # 4. diversity: MS-SSIM within each set
    if "diversity" in cfg.metrics:
        t0 = time.perf_counter()
        dc = cfg.diversity
        div = {role: within_set_msssim(load_gray_stack(sets[role].paths, dc.image_size, images), dc.pairs, cfg.seed,
                                       role="synthetic" if role == "fake" else "real")
               for role in ("fake", "real")}
        results["diversity"] = {"image_size": dc.image_size, "synthetic": div["fake"], "real": div["real"],
                                "synthetic_minus_real": div["fake"]["mean"] - div["real"]["mean"]}
        if div["fake"]["mean"] > div["real"]["ci"][1]:
            warnings.append("synthetic images are more alike than real ones (MS-SSIM above the real CI): possible mode collapse")
        timings["diversity"] = time.perf_counter() - t0

    # 5. memorization against the training images
    if "memorization" in cfg.metrics:
        t0 = time.perf_counter()
        mc = cfg.memorization
        pairs_dir = mc.pairs_dir or cfg.out.with_name(f"{cfg.out.stem}_pairs")
        from synthcxr.evaluate.features import resolve_device

        hold_paths, hold_feats, hold_source = holdout_images(
            [(r, sets[r].paths, feats[r], hashes[r]) for r in null_roles], set(hashes["train"]))
        flag_by_features = mc.flag_by_features if mc.flag_by_features is not None else bool(extractor and extractor.pretrained)
        results["memorization"] = memorization_check(
            feats["fake"], feats["train"], sets["fake"].paths, train_set.paths, holdout_feats=hold_feats,
            holdout_paths=hold_paths, holdout_source=hold_source, search=mc.search(), candidates=mc.candidates,
            quantile=mc.quantile, feature_threshold=mc.feature_threshold, copy_threshold=mc.copy_threshold,
            flag_by_features=flag_by_features, null_images=mc.null_images, top_pairs=mc.top_pairs, pairs_dir=pairs_dir if mc.top_pairs else None,
            flagged_file=cfg.out.with_name(f"{cfg.out.stem}_flagged.jsonl"), images=images, device=resolve_device(cfg.extractor.device))
        results["memorization"]["train_source"] = "train" if cfg.train is not None else "real"
        if results["memorization"]["calibration"]["null"] != "hold-out":
            warnings.append(f"memorization thresholds: {results['memorization']['calibration']['note']}")
        if results["memorization"]["n_flagged"]:
            warnings.append(f"memorization: {results['memorization']['n_flagged']} synthetic image(s) are near copies "
                            f"of training images; see {pairs_dir}")
        timings["memorization"] = time.perf_counter() - t0

    # 5b. patient re-identification: is a synthetic image another image of a training patient?
    if "reid" in cfg.metrics:
        if cfg.reid.weights is None:
            skipped["reid"] = ("no re-identification network: train one with `synthcxr privacy train-reid --data SET "
                               "--out DIR` and pass --set reid.weights=DIR/reid.pt")
        else:
            from synthcxr.evaluate.features import resolve_device
            from synthcxr.evaluate.reid import reid_check

            t0 = time.perf_counter()
            results["reid"], warn = reid_check(
                sets["fake"].paths, train_set.paths, cfg.reid, device=resolve_device(cfg.extractor.device),
                pairs_dir=(cfg.reid.pairs_dir or cfg.out.with_name(f"{cfg.out.stem}_reid_pairs")) if cfg.reid.top_pairs else None,
                images=images)
            results["reid"]["train_source"] = "train" if cfg.train is not None else "real"
            warnings += warn
            if results["reid"]["n_above"]:
                warnings.append(f"re-identification: {results['reid']['n_above']} synthetic image(s) score above the "
                                f"threshold for showing a training patient ({results['reid']['threshold']:.3f})")
            timings["reid"] = time.perf_counter() - t0

    # 6. downstream utility and conditioning fidelity
    if "utility" in cfg.metrics:
        t0 = time.perf_counter()
        labelled = [it for it in train_set.items if it.label is not None]  # unknown labels: an error in utility_check
        if not labelled:
            skipped["utility"] = ("the real training images have no normal/tuberculosis labels (use a Montgomery/Shenzhen "
                                  "data set, or normal/ and tuberculosis/ subfolders)")
        else:
            from synthcxr.evaluate.features import resolve_device

            results["utility"] = utility_check(
                labelled, sets["test"].items if "test" in sets else None, sets["fake"].items, cfg.utility,
                device=resolve_device(cfg.extractor.device), seed=cfg.seed,
                split_path=cfg.out.with_name(f"{cfg.out.stem}_split.json"), images=images, split_file=cfg.split,
                scores_path=cfg.out.with_name(f"{cfg.out.stem}_label_scores.csv"))
            warnings += results["utility"].pop("warnings", [])
        timings["utility"] = time.perf_counter() - t0

    for metric, reason in skipped.items():
        warnings.append(f"{metric} skipped: {reason}")
    timings["total"] = time.perf_counter() - started
    results.update({"skipped": skipped, "warnings": warnings, "timings_s": timings,
                    "image_cache": images.stats() if images is not None else None})
    # 7. one JSON, written atomically
    atomic_write_json(cfg.out, results)
    for w in warnings:
        if extractor is None or w != extractor.weights_warning:  # that one was logged when it arose
            log.warning(w)
    return results
