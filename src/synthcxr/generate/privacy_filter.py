"""Privacy-filtered generation (`generate --privacy-filter eval.json|auto`): a new image that is too
close to a training image is discarded and made again with the next seed, in the spirit of
Packhäuser et al. 2023's privacy-enhancing sampling.

What a candidate is checked with (the numbers `synthcxr evaluate` reports, computed by its code):
- the calibrated memorization similarity (evaluate/memorization.py): copy similarity to the nearest
  training images (NCC through small shifts, rotations, zooms and the mirror) and, with a pretrained
  extractor, the centred feature cosine; above either threshold = a near copy;
- with a re-identification network (`privacy.reid.weights`, or the one the evaluation JSON used),
  the re-ID score P(same patient) against the nearest training images, above its threshold.

Where the thresholds come from:
- `eval.json`: the results of `synthcxr evaluate` with the memorization metric. Its thresholds,
  extractor, copy search and training set are used, so the rule that flagged images there rejects
  them here. The JSON is checked before any work (thresholds present, the same extractor).
- `auto`: calibrated as evaluate does (`memorization.calibrate_null`): the 0.99 quantile of real
  images that are not copies (`privacy.holdout`, else leave-one-out within `privacy.train`).

The next seed (what keeps the whole set deterministic): image i first tries its own seed `seed + i`
in its batch, exactly as plain generate. Try k = 1, 2, ... of a rejected image uses
`(seed + i + k * 2^24) mod 2^32` and is generated alone (a batch of one); mod 2^32 because torch's CPU
generator keeps only the low 32 bits of a seed. These seeds differ from every first try and from
each other for sets of up to 2^24 images and up to 256 tries. Each candidate is scored alone.
So whether and how an image is regenerated depends only on its index, the fixed training set and the
thresholds: not on its batch, on other images' rejections, on the resume point or on the shard, and
the files are byte-identical whichever way the set is made. After `privacy.max_tries` rejected
candidates an image is left out (no file, no manifest line); the other images are finished and the
run then stops with an error naming the left-out images.

Limits: the check sees what evaluate's memorization check sees (see its `search` description):
larger transformations, partial copies and a source image outside the compared candidates pass;
"not rejected" is a calibrated statistical statement (about 1% of genuinely new images score above
a 0.99 quantile and are regenerated), not a guarantee that no patient can be recognised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from synthcxr.config import StrictModel
from synthcxr.errors import ConfigError, SynthCXRError
from synthcxr.evaluate.features import ExtractorConfig
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

RETRY_STRIDE = 2**24
"""Try k of image i uses (seed + i + k * RETRY_STRIDE) mod 2^32 (torch seeds its CPU generator with the low
32 bits): distinct from every first try and every other retry for sets of up to 2^24 images."""
SEED_SPACE = 2**32
RECORD = "privacy_filter.json"
"""Written into the output folder: thresholds, where they came from, the training set, the retry rule."""
_EVAL_FIX = ("pass the results JSON of `synthcxr evaluate --metrics memorization --train TRAIN --out FILE` "
             "(evaluated against the model's training images), or use --privacy-filter auto")


class PrivacyReidConfig(StrictModel):
    """The re-identification part of the filter (off without a network)."""

    weights: Path | None = None
    """A network from `synthcxr privacy train-reid` (its reid.pt or folder). Default: the one the evaluation JSON used."""
    threshold: float | None = Field(None, ge=0, le=1)
    """A fixed re-ID threshold. Default: the evaluation's, else the network's calibrated one."""
    candidates: int | None = Field(None, ge=1)
    """Training images scored per candidate (default: as many as the threshold was calibrated with)."""


class PrivacyFilterConfig(StrictModel):
    """`generate --privacy-filter`: discard and regenerate images too close to the training set."""

    filter: str | None = None
    """An evaluation results JSON (`synthcxr evaluate --out`) or `auto`; unset = no filter."""
    train: Path | None = None
    """The model's training images. Default: the evaluation's training set (eval.json), or the run's data folder (auto)."""
    holdout: Path | None = None
    """auto: real images not used in training, for the null (default: leave-one-out within `train`)."""
    extractor: ExtractorConfig | None = None
    """auto: the feature extractor (default: inception). With eval.json it must be the evaluation's (or unset)."""
    memorization: dict[str, Any] = Field(default_factory=dict)
    """auto: evaluate's memorization settings (quantile, image_size, copy_threshold, ...); see `synthcxr evaluate`."""
    reid: PrivacyReidConfig = Field(default_factory=PrivacyReidConfig)
    max_tries: int = Field(10, ge=1, le=256)
    """Candidates per image (the first plus the retries) before the image is left out with an error."""
    device: str = "auto"
    """Where features and copy similarities are computed (auto: CUDA, then MPS, then CPU)."""
    cache: bool = True
    """Training-set features from the feature cache evaluate uses (by file content)."""

    @field_validator("memorization")
    @classmethod
    def _memorization_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            _memorization_config(value)  # unknown keys and bad values are named now, not after loading a model
        return value


def _memorization_config(data: dict[str, Any]) -> Any:
    from synthcxr.evaluate.run import MemorizationConfig

    return MemorizationConfig.model_validate(data)


def retry_seed(seed: int, k: int) -> int:
    """The seed of try k of an image whose own seed (try 0, `seed + i`) is `seed`."""
    return seed if k == 0 else (seed + k * RETRY_STRIDE) % SEED_SPACE


# --------------------------------------------------------------------------- 1. settings, checked before any work
@dataclass
class FilterPlan:
    """What the filter will use, read and checked before the model is loaded."""

    mode: str
    """eval.json or auto."""
    source: Path | None
    extractor: ExtractorConfig
    memorization: Any
    """evaluate's MemorizationConfig."""
    train: Path
    holdout: Path | None = None
    thresholds: dict[str, Any] | None = None
    """eval.json: the evaluation's thresholds section."""
    flag_by_features: bool | None = None
    extractor_id: str | None = None
    """eval.json: the extractor identity the thresholds were calibrated with."""
    n_train: int | None = None
    reid_weights: Path | None = None
    reid_threshold: float | None = None
    reid_rule: str | None = None
    reid_candidates: int | None = None


def plan_filter(cfg: PrivacyFilterConfig, model: str) -> FilterPlan | None:
    """Read and check the filter's inputs (cheap); None when no filter is asked for."""
    if cfg.filter is None:
        return None
    plan = _plan_auto(cfg, model) if cfg.filter == "auto" else _plan_from_evaluation(cfg, Path(cfg.filter))
    if cfg.reid.weights is not None:
        plan.reid_weights = cfg.reid.weights
        plan.reid_threshold, plan.reid_rule = cfg.reid.threshold, None
        plan.reid_candidates = cfg.reid.candidates
    elif cfg.reid.threshold is not None:
        plan.reid_threshold, plan.reid_rule = cfg.reid.threshold, None
    if plan.reid_weights is not None and not Path(plan.reid_weights).exists():
        raise ConfigError("re-identification network not found", file=plan.reid_weights,
                          fix="pass the reid.pt made by `synthcxr privacy train-reid` with --set privacy.reid.weights=FILE")
    if not plan.train.is_dir():
        raise ConfigError("the privacy filter's training image folder does not exist", file=plan.train,
                          fix="pass the images the model was trained on with --set privacy.train=DIR")
    return plan


def _plan_auto(cfg: PrivacyFilterConfig, model: str) -> FilterPlan:
    train = cfg.train or _run_data_folder(model)
    if train is None:
        raise ConfigError("--privacy-filter auto needs the model's training images",
                          fix="pass them with --set privacy.train=DIR (and real images not used in training with "
                              "--set privacy.holdout=DIR, for calibrated thresholds)")
    return FilterPlan("auto", None, cfg.extractor or ExtractorConfig(), _memorization_config(cfg.memorization),
                      Path(train).expanduser(), holdout=cfg.holdout)


def _run_data_folder(model: str) -> Path | None:
    """The data folder of a synthcxr training run (all its images: a conservative training set)."""
    from synthcxr.models.load import RUN_MODEL_FILE

    run_config = Path(model) / "config.yaml"
    if not (Path(model) / RUN_MODEL_FILE).is_file() or not run_config.is_file():
        return None
    from synthcxr.train.config import load_train_config

    path = load_train_config(run_config).data.path
    return path if isinstance(path, Path) else None


def _number(node: Any, *keys: str) -> float | None:
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def _plan_from_evaluation(cfg: PrivacyFilterConfig, path: Path) -> FilterPlan:
    from synthcxr.release.filters import read_evaluation

    try:
        data = read_evaluation(path)
    except ConfigError as exc:
        raise ConfigError(exc.message, file=path, fix=_EVAL_FIX) from None
    mem = data.get("memorization")
    if not isinstance(mem, dict):
        raise ConfigError("the evaluation results hold no memorization check, so there is no threshold to filter by",
                          file=path, fix=_EVAL_FIX)
    thresholds = mem.get("thresholds")
    for key in ("copy_similarity", "feature_cosine"):
        if _number(thresholds, key, "threshold") is None:
            raise ConfigError(f"the evaluation results have no memorization threshold "
                              f"(memorization.thresholds.{key}.threshold is missing)", file=path, fix=_EVAL_FIX)
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    described = data.get("extractor") if isinstance(data.get("extractor"), dict) else {}
    if not isinstance(config.get("extractor"), dict) or not described.get("id"):
        raise ConfigError("the evaluation results do not say which extractor made their features "
                          "(config.extractor / extractor.id)", file=path, fix=_EVAL_FIX)
    try:
        extractor = ExtractorConfig.model_validate({**config["extractor"], "device": cfg.device})
        memorization = _memorization_config(config.get("memorization") or {})
    except ValueError as exc:
        raise ConfigError(f"the evaluation's settings cannot be read ({exc})", file=path, fix=_EVAL_FIX) from None
    if cfg.extractor is not None:
        asked = cfg.extractor.model_dump(exclude={"device", "batch_size", "num_workers"})
        used = extractor.model_dump(exclude={"device", "batch_size", "num_workers"})
        if asked != used:
            diff = ", ".join(f"{k}: {used[k]!r} there, {asked[k]!r} asked" for k in used if used[k] != asked.get(k))
            raise ConfigError(f"the thresholds in this evaluation were calibrated with another extractor ({diff}); "
                              "a threshold holds only for the features it was calibrated on", file=path,
                              fix="drop privacy.extractor to use the evaluation's, evaluate again with the extractor you "
                                  "want, or use --privacy-filter auto")
    if cfg.memorization:
        raise ConfigError("privacy.memorization settings apply to --privacy-filter auto only; with an evaluation "
                          "JSON its own settings are used", file=path, fix="drop the privacy.memorization settings")
    train = cfg.train
    if train is None:
        recorded = config.get("train") or config.get("real")
        if not recorded:
            raise ConfigError("the evaluation results do not name their training set (config.train)", file=path,
                              fix="pass the model's training images with --set privacy.train=DIR")
        train = Path(recorded)
        if not train.expanduser().is_dir():
            raise ConfigError(f"the evaluation's training images ({train}) are not found from here", file=path,
                              fix="pass the same images with --set privacy.train=DIR")
    plan = FilterPlan("eval.json", path, extractor, memorization, Path(train).expanduser(),
                      thresholds={k: mem["thresholds"][k] for k in ("copy_similarity", "feature_cosine")},
                      flag_by_features=bool(mem.get("flag_by_features", True)), extractor_id=str(described["id"]),
                      n_train=int(mem["n_train"]) if isinstance(mem.get("n_train"), int) else None)
    reid = data.get("reid")
    if isinstance(reid, dict) and isinstance(reid.get("network"), dict) and _number(reid, "threshold") is not None:
        plan.reid_weights = Path(reid["network"]["weights"])
        plan.reid_threshold, plan.reid_rule = float(reid["threshold"]), reid.get("threshold_rule")
        plan.reid_candidates = int(reid["candidates"]) if isinstance(reid.get("candidates"), int) else None
    return plan


# --------------------------------------------------------------------------- 2. the filter, prepared once per run
@dataclass
class PrivacyFilter:
    """Scores candidates against the training set; decides keep or regenerate."""

    plan: FilterPlan
    max_tries: int
    extractor: Any
    search: Any
    candidates: int
    train_feats: np.ndarray
    train_px: np.ndarray
    copy_threshold: float
    feature_threshold: float
    flag_by_features: bool
    device: str
    record: dict[str, Any]
    reid: Any = None
    reid_train: np.ndarray | None = None
    reid_threshold: float | None = None
    reid_k: int = 10
    left_out: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """Identity of every setting a decision depends on (recorded per image; a resume must match it)."""
        return self.record["fingerprint"]

    def score(self, data: bytes) -> dict[str, float]:
        """The candidate's scores, computed from its encoded file exactly as evaluate reads that file."""
        from synthcxr.evaluate.images import compact, decode_image, resize_rgb
        from synthcxr.evaluate.memorization import nearest_training

        px = compact(decode_image(data))
        feat = self.extractor(resize_rgb(px, self.extractor.input_size).transpose(2, 0, 1)[None])
        gray = (resize_rgb(px, self.search.size).mean(axis=2) / 255.0).astype(np.float32)[None]
        near = nearest_training(feat, gray, self.train_feats, self.train_px, self.search, self.candidates,
                                device=self.device)
        scores = {"copy_similarity": round(float(near.copy_sim[0]), 6), "feature_cosine": round(float(near.feat_sim[0]), 6)}
        if self.reid is not None:
            from synthcxr.privacy.reid import search_scores

            size = self.reid.cfg.image_size
            emb = self.reid.embed((resize_rgb(px, size).mean(axis=2) / 255.0).astype(np.float32)[None])
            best, _ = search_scores(self.reid, emb, self.reid_train, self.reid_k)
            scores["reid"] = round(float(best[0, 0]), 6)
        return scores

    def rejects(self, scores: dict[str, float]) -> bool:
        from synthcxr.evaluate.memorization import is_flagged

        near_copy = is_flagged(scores["copy_similarity"], scores["feature_cosine"], self.copy_threshold,
                               self.feature_threshold, self.flag_by_features)
        return near_copy or ("reid" in scores and scores["reid"] > self.reid_threshold)

    def screen(self, index: int, seed: int, first: bytes,
               regenerate: Callable[[int], bytes]) -> tuple[bytes | None, dict[str, Any]]:
        """(the kept file, its manifest fields), or (None, ...) when every try was rejected.

        `first` is image `index`'s own candidate (seed `seed`); `regenerate(s)` makes the file for seed s alone.
        """
        tries: list[dict[str, Any]] = []
        data = first
        for k in range(self.max_tries):
            s = retry_seed(seed, k)
            if k:
                data = regenerate(s)
            scores = self.score(data)
            kept = not self.rejects(scores)
            tries.append({"seed": s, **scores, "decision": "kept" if kept else "rejected"})
            if kept:
                return data, {"seed_used": s, "seeds_tried": [t["seed"] for t in tries],
                              "privacy": {"decision": "kept", "discarded": k, "tries": tries}}
        self.left_out.append({"index": index, "seeds_tried": [t["seed"] for t in tries]})
        log.warning("image %d: all %d candidates were too close to a training image; it is left out", index, self.max_tries)
        return None, {"privacy": {"decision": "left out", "tries": tries}}

    def raise_if_left_out(self, out: Path) -> None:
        if self.left_out:
            listed = ", ".join(str(x["index"]) for x in self.left_out[:10])
            raise SynthCXRError(
                f"privacy filter: {len(self.left_out)} image(s) had no acceptable candidate in "
                f"{self.max_tries} tries (index {listed}{', ...' if len(self.left_out) > 10 else ''}); they were left "
                "out, every other image is finished", file=out / RECORD,
                fix="this many near copies means the model memorizes its training images (look at the pairs of "
                    "`synthcxr evaluate`); re-running with a larger --set privacy.max_tries=N makes only the missing images")


def prepare_filter(plan: FilterPlan, cfg: PrivacyFilterConfig, out: Path, *, device: str | None = None) -> PrivacyFilter:
    """Training features, thresholds (read or calibrated) and the re-ID network; writes OUT/privacy_filter.json.

    `device`: the generation's (this rank's GPU), used when `privacy.device` is auto."""
    from synthcxr.evaluate.features import (
        FeatureCache,
        build_extractor,
        default_cache_dir,
        extract_features,
        resolve_device,
    )
    from synthcxr.evaluate.images import load_gray_stack, read_image_set
    from synthcxr.evaluate.memorization import calibrate_null, holdout_images

    device = device if cfg.device == "auto" and device is not None else resolve_device(cfg.device)
    extractor = build_extractor(plan.extractor.model_copy(update={"device": device}), default_cache_dir())
    if plan.extractor_id is not None and extractor.id != plan.extractor_id:
        raise ConfigError(f"the extractor gives other features now than when the evaluation was made (id "
                          f"{plan.extractor_id!r} there, {extractor.id!r} now: other weights or input size)",
                          file=plan.source, fix="evaluate again with the current extractor, or use --privacy-filter auto")
    if extractor.weights_warning:
        log.warning(extractor.weights_warning)
    mc = plan.memorization
    search = mc.search()
    train_set = read_image_set(plan.train, "train")
    cache = FeatureCache(default_cache_dir() / "features.sqlite") if cfg.cache else None
    try:
        train = extract_features(train_set.paths, extractor, cache, batch_size=plan.extractor.batch_size,
                                 description="privacy filter: training features")
        if plan.n_train is not None and len(train.features) != plan.n_train:
            raise ConfigError(f"the evaluation's memorization check used {plan.n_train} training images; {plan.train} "
                              f"holds {len(train.features)}", file=plan.source,
                              fix="pass the same training images with --set privacy.train=DIR, or evaluate again")
        train_paths = [train_set.paths[i] for i in train.kept]
        train_px = load_gray_stack(train_paths, search.size)
        flag_by_features = plan.flag_by_features if plan.flag_by_features is not None else (
            mc.flag_by_features if mc.flag_by_features is not None else extractor.pretrained)
        if plan.thresholds is not None:
            thresholds, calibration = plan.thresholds, {"source": f"evaluation {plan.source}"}
        else:
            hold = []
            if plan.holdout is not None:
                hold_set = read_image_set(plan.holdout, "holdout")
                res = extract_features(hold_set.paths, extractor, cache, batch_size=plan.extractor.batch_size,
                                       description="privacy filter: hold-out features")
                hold = [("holdout", [hold_set.paths[i] for i in res.kept], res.features, res.hashes)]
            hold_paths, hold_feats, hold_source = holdout_images(hold, set(train.hashes))
            cal = calibrate_null(train.features, train_px, train_paths, holdout_feats=hold_feats, holdout_paths=hold_paths,
                                 holdout_source=hold_source, search=search, candidates=mc.candidates,
                                 quantile=mc.quantile, feature_threshold=mc.feature_threshold,
                                 copy_threshold=mc.copy_threshold, null_images=mc.null_images, device=device)
            thresholds = cal.thresholds
            calibration = {"source": "calibrated (auto)", "null": cal.kind, "note": cal.note, "n_null": cal.n_null,
                           "quantile": mc.quantile}
    finally:
        if cache is not None:
            cache.close()
    filt = PrivacyFilter(plan, cfg.max_tries, extractor, search, mc.candidates, train.features, train_px,
                         float(thresholds["copy_similarity"]["threshold"]), float(thresholds["feature_cosine"]["threshold"]),
                         bool(flag_by_features), device, record={})
    reid = None
    if plan.reid_weights is not None:
        from synthcxr.evaluate.reid import _embed_paths
        from synthcxr.privacy.reid import load_reid

        filt.reid = load_reid(plan.reid_weights, device)
        cal_reid = filt.reid.calibration
        filt.reid_k = plan.reid_candidates or int(cal_reid.get("candidates", 10))
        if plan.reid_threshold is not None:
            filt.reid_threshold = plan.reid_threshold
            rule = plan.reid_rule or f"fixed threshold {plan.reid_threshold} (privacy.reid.threshold)"
        else:
            filt.reid_threshold, rule = float(cal_reid["search_threshold"]), cal_reid.get("rule", "calibrated")
        filt.reid_train = _embed_paths(filt.reid, train_paths, None, 64)
        reid = {"weights": str(plan.reid_weights), "sha256": _file_sha(plan.reid_weights), "threshold": filt.reid_threshold,
                "threshold_rule": rule, "candidates": filt.reid_k}
    decisive = {
        "copy_threshold": filt.copy_threshold, "feature_threshold": filt.feature_threshold,
        "flag_by_features": filt.flag_by_features, "extractor": extractor.id, "search": search.describe(),
        "candidates": mc.candidates, "train": hashlib.sha256("\n".join(sorted(train.hashes)).encode()).hexdigest(),
        "reid": reid and {k: reid[k] for k in ("sha256", "threshold", "candidates")},
    }
    filt.record = {
        "mode": plan.mode, "source": str(plan.source) if plan.source else None,
        "fingerprint": hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "rule": (f"rejected when copy similarity > {filt.copy_threshold:.4f}"
                 + (f" or feature cosine > {filt.feature_threshold:.4f}" if filt.flag_by_features else
                    " (feature cosines recorded, not used: the extractor has random weights)")
                 + (f" or re-ID score > {filt.reid_threshold:.4f}" if reid else "")),
        "next_seed": f"try k >= 1 of image i uses (seed + i + k * {RETRY_STRIDE}) mod 2^32, generated alone; "
                     f"at most {cfg.max_tries} tries",
        "thresholds": thresholds, "calibration": calibration, "extractor": extractor.describe(),
        "train": {"path": str(plan.train), "n": len(train_paths)}, "reid": reid,
    }
    from synthcxr.fileio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RECORD, filt.record)
    log.info("privacy filter (%s): %s", plan.mode, filt.record["rule"])
    return filt


def _file_sha(path: Path) -> str:
    from synthcxr.fileio import sha256_file

    path = Path(path)
    return sha256_file(path / "reid.pt" if path.is_dir() else path)[:16]


def summary_line(out: Path) -> str | None:
    """`privacy filter: N candidate(s) discarded ...` from the manifest, or None without a filter."""
    from synthcxr.fileio import read_jsonl
    from synthcxr.generate.manifest import MANIFEST

    rows = [r for r in read_jsonl(Path(out) / MANIFEST) if isinstance(r.get("privacy"), dict)]
    if not rows:
        return None
    discarded = sum(int(r["privacy"].get("discarded", 0)) for r in rows)
    affected = sum(1 for r in rows if r["privacy"].get("discarded"))
    return (f"privacy filter: {discarded} candidate image(s) discarded and regenerated with the next seed "
            f"({affected} of {len(rows)} image(s) affected); rule and thresholds in {Path(out) / RECORD}")
