"""Memorization (privacy) check: does any synthetic image copy a training image?

A generator that memorizes rarely returns the training file byte for byte: its copies come out a few
pixels shifted, slightly rotated or zoomed, mirrored, re-encoded or brighter. So for every synthetic
image we find its nearest training image twice:
- by cosine similarity of extractor features centred on the training-set mean, and
- by a copy similarity in image space: normalised cross-correlation (NCC) of grayscale images at a
  small size (`CopySearch.size`, 64 px), maximised over the horizontal mirror, shifts up to
  `max_shift` px, rotations and rescales (crops) on a grid. NCC ignores brightness and contrast
  changes, and at 64 px JPEG artefacts and noise are averaged away. It is computed only against
  candidates: the `candidates` nearest training images by features plus as many by 8x8 thumbnails
  (mirror-tolerant), so weak features (random weights) cannot hide a copy from it.

Thresholds are calibrated, not fixed: chest X-rays all look alike at low resolution, and how alike
depends on the data. The same two similarities are computed between *real images that are not in
the training set* (hold-outs) and the training set: this is the null distribution (real images that
are not copies). A synthetic image is flagged when either similarity exceeds the `quantile` of its
null (so at quantile 0.99 about 1% of genuinely new images would be flagged). Without hold-outs the
null is leave-one-out within the training set (each training image against the others), and with
fewer than `MIN_NULL` null images fixed fallback thresholds are used; the result says which.
The most similar pairs are saved side by side (synthetic left, training right) for a human to judge.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from PIL import Image

from synthcxr.errors import EvaluationError
from synthcxr.evaluate.imagecache import DecodedImageCache
from synthcxr.evaluate.images import load_gray, load_gray_stack
from synthcxr.fileio import atomic_write_bytes
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)

MIN_NULL = 10
"""Fewer null images than this cannot calibrate a threshold (hold-outs: leave-one-out is tried next;
then the fixed fallbacks below are used)."""
FALLBACK_THRESHOLDS = {"copy_similarity": 0.97, "feature_cosine": 0.95}
"""Used only without a null. Copy similarity: on the 16 Shenzhen test images, different patients
reach at most 0.94 and planted near copies at least 0.98 (64 px). Feature cosine: the long-standing
default, meaningful only for pretrained extractors."""
FLAGGED_INLINE = 100
"""Flagged pairs kept in the results JSON; all of them (any number) go to `flagged_file` when there are more."""
THUMB = 8
"""Side of the thumbnails that pick image-space candidates (coarse enough to tolerate the search range)."""


def _default_scales() -> tuple[float, ...]:
    return tuple(round(float(s), 4) for s in np.geomspace(0.85, 1 / 0.85, 9))


@dataclass(frozen=True)
class CopySearch:
    """The transformations the copy similarity looks through (applied to the synthetic image)."""

    size: int = 64
    """Comparison size in pixels (both images resized to size x size)."""
    max_shift: int = 8
    """Largest shift tried, in pixels at `size` (the central (size - 2 max_shift)^2 region is matched)."""
    rotations: tuple[float, ...] = (-5.0, -2.5, 0.0, 2.5, 5.0)
    """Rotations tried, degrees."""
    scales: tuple[float, ...] = field(default_factory=_default_scales)
    """Magnifications tried: < 1 undoes a zoom-in (a crop), > 1 a zoom-out (a rescale with a border)."""
    mirror: bool = True

    def __post_init__(self) -> None:
        if self.size < 16 or self.max_shift < 0 or self.size - 2 * self.max_shift < self.size // 2:
            raise EvaluationError(f"copy search: size {self.size} with max_shift {self.max_shift} leaves too small a region",
                                  fix="use memorization.image_size >= 16 and memorization.max_shift <= image_size / 4")
        if not self.rotations or not self.scales or min(self.scales) <= 0:
            raise EvaluationError("copy search: rotations and scales must be non-empty and scales positive",
                                  fix="e.g. memorization.rotations=[0] and memorization.scales=[1.0] for shifts only")

    def warps(self) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """W x 2 x 3 affine matrices (torch `affine_grid` convention) and what each one does."""
        thetas, meta = [], []
        for flip in ([False, True] if self.mirror else [False]):
            for rot in self.rotations:
                for scale in self.scales:
                    a = math.radians(rot)
                    c, s = math.cos(a) / scale, math.sin(a) / scale
                    m = -1.0 if flip else 1.0
                    thetas.append([[c * m, -s, 0.0], [s * m, c, 0.0]])
                    meta.append({"mirror": flip, "rotation_deg": rot, "scale": scale})
        return np.asarray(thetas, np.float32), meta

    def describe(self) -> dict[str, Any]:
        """What "not flagged" covers, for the results JSON and the report."""
        pct = 100 * self.max_shift / self.size
        covered = [
            "exact copies, re-encoding (JPEG) and noise (compared at low resolution)",
            "brightness and contrast changes (normalised cross-correlation)",
            f"shifts up to {self.max_shift} px at {self.size} px ({pct:.0f}% of the image side)",
            f"rotations up to {max(abs(r) for r in self.rotations):g} degrees (grid {sorted(self.rotations)})",
            f"zoom {min(self.scales):.2f}-{max(self.scales):.2f} (crops keeping >= {min(self.scales):.0%} of the side, "
            f"rescales down to {1 / max(self.scales):.2f} with a border)",
        ]
        if self.mirror:
            covered.append("the horizontal mirror")
        return {"size": self.size, "max_shift": self.max_shift, "rotations": list(self.rotations),
                "scales": list(self.scales), "mirror": self.mirror, "covered": covered,
                "not_covered": ["larger shifts, rotations or crops than the above; vertical flips",
                                "partial copies (a region of a training image inside a new image) and local edits",
                                "a source image that is not among the compared candidates (nearest by features "
                                "and by thumbnails)"]}


def cosine_matrix(a: np.ndarray, b: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of rows of a and b, optionally after subtracting `center` from both."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if center is not None:
        a, b = a - center, b - center
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return a @ b.T


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def thumbnail_similarity(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Q x N correlation of THUMB x THUMB block means, the better of the query and its mirror."""
    def thumbs(stack: np.ndarray) -> np.ndarray:
        n, s, _ = stack.shape
        b = s // THUMB
        t = stack[:, :b * THUMB, :b * THUMB].reshape(n, THUMB, b, THUMB, b).mean(axis=(2, 4))
        return t.reshape(n, -1).astype(np.float64)

    r = _unit_rows(thumbs(refs))
    q = thumbs(queries)
    q_mirror = thumbs(queries[:, :, ::-1])
    return np.maximum(_unit_rows(q) @ r.T, _unit_rows(q_mirror) @ r.T)


def _window_sum(x: Any, t: int) -> Any:
    """Sum over every t x t window (stride 1) of K x 1 x S x S, from an integral image (float64)."""
    import torch.nn.functional as F

    c = F.pad(x.float() if x.device.type == "mps" else x.double(), (1, 0, 1, 0)).cumsum(2).cumsum(3)  # mps: no float64
    return c[..., t:, t:] - c[..., :-t, t:] - c[..., t:, :-t] + c[..., :-t, :-t]


def _ncc(cands: Any, templates: Any, groups: int = 1) -> Any:
    """Normalised cross-correlation of unit-norm, zero-mean t x t templates with every t x t window.

    cands: K x 1 x S x S. groups=1: templates W x 1 x t x t, result K x W x span x span. groups=K:
    templates (K*J) x 1 x t x t (J per candidate), result K x J x span x span.
    """
    import torch
    import torch.nn.functional as F

    k, t = cands.shape[0], templates.shape[-1]
    n = t * t
    if groups == 1:
        corr = F.conv2d(cands, templates)
    else:
        corr = F.conv2d(cands.reshape(1, k, *cands.shape[2:]), templates, groups=groups)
        corr = corr.reshape(k, -1, *corr.shape[2:])
    s1, s2 = _window_sum(cands, t), _window_sum(cands * cands, t)
    norm = (s2 - s1 * s1 / n).clamp_min(0).sqrt().float()  # K x 1 x span x span
    return torch.where(norm > 1e-6, corr / norm.clamp_min(1e-6), torch.zeros_like(corr)).clamp(-1, 1)


def _templates(q: Any, grid: Any, margin: int) -> Any:
    """The query warped by each affine grid, central region only, zero-mean and unit-norm (W x 1 x t x t)."""
    import torch.nn.functional as F

    s = q.shape[-1]
    warped = F.grid_sample(q[None, None].expand(len(grid), 1, s, s), grid, mode="bilinear", padding_mode="border",
                           align_corners=False)[:, :, margin:s - margin, margin:s - margin]
    warped = warped - warped.mean(dim=(2, 3), keepdim=True)
    return warped / warped.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None, None]


@contextmanager
def _one_thread_on_cpu(device: str) -> Iterator[None]:
    """Intra-op threads do not pay on 64 px tensors: their start-up costs more than the work, and on a
    busy machine (CI) it made the search 10x slower. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def copy_similarity(queries: np.ndarray, refs: np.ndarray, candidates: np.ndarray, search: CopySearch,
                    *, device: str = "cpu", description: str | None = None, refine: int = 3,
                    refine_candidates: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NCC of each query against its candidate refs, maximised over `search`'s warps and shifts.

    queries: Q x S x S, refs: N x S x S (float in [0, 1], S = search.size); candidates: Q x K indices
    into refs. Returns (Q x K similarity, Q x K warp index, Q x K x 2 shift (dy, dx) in px).
    Coarse to fine: every warp is tried at half size (shifts up to max_shift / 2), then the `refine`
    best warps of the `refine_candidates` best candidates at full size; the other candidates get NaN
    (they are not the nearest). Each warped query's central region is slid over the candidate (conv2d;
    zero-mean unit-norm template, each window normalised by its own mean and norm). `refine` 0 tries
    every warp on every candidate at full size (about 6x slower).
    """
    import torch
    import torch.nn.functional as F

    q_n, k_all = candidates.shape
    s, m = search.size, search.max_shift
    span = 2 * m + 1
    thetas, _ = search.warps()
    w = len(thetas)
    dev = torch.device(device)
    theta = torch.from_numpy(thetas).to(dev)
    refs_t = torch.from_numpy(np.ascontiguousarray(refs, np.float32)).to(dev)
    grid = F.affine_grid(theta, [w, 1, s, s], align_corners=False)
    coarse = 0 < refine < w and s % 2 == 0
    if coarse:
        refs_half = F.avg_pool2d(refs_t[:, None], 2)[:, 0]
        grid_half = F.affine_grid(theta, [w, 1, s // 2, s // 2], align_corners=False)
    sims = np.zeros((q_n, k_all), np.float32)
    warp_idx = np.zeros((q_n, k_all), np.int64)
    shifts = np.zeros((q_n, k_all, 2), np.int64)
    show = bool(description) and q_n >= 64
    with _one_thread_on_cpu(dev.type), progress_bar(q_n, description or "") if show else nullcontext() as bar:
        for i in range(q_n):
            uniq, inverse = np.unique(candidates[i], return_inverse=True)  # each candidate once
            k = len(uniq)
            idx = torch.from_numpy(uniq).to(dev)
            q = torch.from_numpy(np.ascontiguousarray(queries[i], np.float32)).to(dev)
            cands = refs_t[idx][:, None]  # K x 1 x S x S
            tmpl = _templates(q, grid, m)  # W x 1 x t x t
            if coarse:
                # 1. every warp at half size; keep the best candidates and their best warps
                q_half = F.avg_pool2d(q[None, None], 2)[0, 0]
                rough = _ncc(refs_half[idx][:, None], _templates(q_half, grid_half, m // 2)).flatten(2).amax(dim=2)
                top = rough.amax(dim=1).topk(min(refine_candidates, k) if refine_candidates > 0 else k).indices
                keep = rough[top].topk(refine, dim=1).indices  # R x refine
                # 2. those warps at full size, each candidate with its own templates (grouped conv)
                ncc = _ncc(cands[top], tmpl[keep.reshape(-1)], groups=len(top))  # R x refine x span x span
                rows = top.cpu().numpy()
            else:
                keep = torch.arange(w, device=dev).expand(k, w)
                ncc = _ncc(cands, tmpl)  # K x W x span x span
                rows = np.arange(k)
            best, arg = ncc.reshape(len(rows), -1).max(dim=1)
            arg = arg.cpu().numpy()
            j, pos = arg // (span * span), arg % (span * span)
            row_sim = np.full(k, np.nan, np.float32)
            row_warp = np.zeros(k, np.int64)
            row_shift = np.zeros((k, 2), np.int64)
            row_sim[rows] = best.cpu().numpy()
            row_warp[rows] = keep.cpu().numpy()[np.arange(len(rows)), j]
            row_shift[rows, 0], row_shift[rows, 1] = pos // span - m, pos % span - m
            sims[i], warp_idx[i], shifts[i] = row_sim[inverse], row_warp[inverse], row_shift[inverse]
            if bar:
                bar[0].update(bar[1], advance=1)
    return sims, warp_idx, shifts


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


@dataclass
class Nearest:
    """Per query: nearest training image by features and by copy similarity, and how it aligned."""

    feat_nn: np.ndarray
    feat_sim: np.ndarray
    copy_nn: np.ndarray
    copy_sim: np.ndarray
    warp: np.ndarray
    shift: np.ndarray


def nearest_training(q_feats: np.ndarray, q_px: np.ndarray, t_feats: np.ndarray, t_px: np.ndarray, search: CopySearch,
                     candidates: int, *, exclude: np.ndarray | None = None, device: str = "cpu",
                     description: str | None = None, block: int = 512) -> Nearest:
    """Both nearest neighbours for each query. `exclude`: per query, a training index it may not match
    (itself, for the leave-one-out null). Candidates are chosen `block` queries at a time, so memory
    stays at block x N_train."""
    n_train = len(t_feats)
    # centred on the training mean: every chest X-ray shares a large common feature component that
    # would otherwise make all pairs look alike (raw cosines of non-negative pooled features are ~0.9)
    center = np.asarray(t_feats, np.float64).mean(axis=0) if n_train > 1 else None
    pool = n_train - (1 if exclude is not None else 0)
    k = pool if candidates <= 0 else min(candidates, pool)
    feat_nn = np.zeros(len(q_feats), np.int64)
    feat_sim = np.zeros(len(q_feats))
    cand = np.zeros((len(q_feats), 2 * k), np.int64)
    for start in range(0, len(q_feats), block):
        stop = min(start + block, len(q_feats))
        cos = cosine_matrix(q_feats[start:stop], t_feats, center)
        thumb = thumbnail_similarity(q_px[start:stop], t_px)
        if exclude is not None:
            rows = np.arange(stop - start)
            cos[rows, exclude[start:stop]] = -np.inf
            thumb[rows, exclude[start:stop]] = -np.inf
        feat_nn[start:stop] = cos.argmax(axis=1)
        feat_sim[start:stop] = cos[np.arange(stop - start), feat_nn[start:stop]]
        for j, sim in enumerate((cos, thumb)):  # the k most similar, in any order
            cand[start:stop, j * k:(j + 1) * k] = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    sims, warps, shifts = copy_similarity(q_px, t_px, cand, search, device=device, description=description)
    best = np.nanargmax(sims, axis=1)
    rows = np.arange(len(cand))
    return Nearest(feat_nn, feat_sim, cand[rows, best], sims[rows, best], warps[rows, best], shifts[rows, best])


def holdout_images(sets: list[tuple[str, list[Path], np.ndarray, list[str]]],
                   train_hashes: set[str]) -> tuple[list[Path], np.ndarray | None, str]:
    """Real images that are not training images (by file content), from (role, paths, features, hashes)
    sets; identical files count once. Returns (paths, features, a description of where they came from)."""
    paths: list[Path] = []
    rows: list[np.ndarray] = []
    seen = set(train_hashes)
    counts: dict[str, int] = {}
    for role, role_paths, feats, hashes in sets:
        for path, feat, sha in zip(role_paths, feats, hashes, strict=True):
            if sha not in seen:
                seen.add(sha)
                paths.append(path)
                rows.append(feat)
                counts[role] = counts.get(role, 0) + 1
    source = ", ".join(f"{n} from --{role}" if role != "holdout" else f"{n} from memorization.holdout"
                       for role, n in counts.items())
    return paths, (np.stack(rows) if rows else None), source


def calibrate(null: np.ndarray | None, quantile: float, fixed: float | None, fallback: float) -> dict[str, Any]:
    """Threshold from the null distribution (or fixed/fallback), with how many null images exceed it.

    With n null images an empirical quantile above 1 - 1/n is just the maximum, which a new unrelated
    image exceeds with probability about 1/(n+1). So for small n the threshold is the larger of the
    empirical quantile and the quantile of a normal fitted to the Fisher z (artanh) of the null.
    `quantile` 1.0 means the maximum of the null.
    """
    if fixed is not None:
        threshold, source = float(fixed), "fixed by the user"
    elif null is None or len(null) < MIN_NULL:
        threshold, source = fallback, "fallback (too few null images)"
    elif quantile >= 1.0:
        threshold, source = float(null.max()), "maximum of the null"
    else:
        threshold = float(np.quantile(null, quantile))
        source = f"empirical {quantile:g} quantile of the null"
        if len(null) * (1 - quantile) < 1:
            z = np.arctanh(np.clip(np.asarray(null, np.float64), -0.999999, 0.999999))
            fitted = float(np.tanh(z.mean() + NormalDist().inv_cdf(quantile) * z.std(ddof=1)))
            if fitted > threshold:
                threshold = fitted
                source = f"{quantile:g} quantile of a normal fitted to the null's Fisher z (n < 1/(1 - {quantile:g}))"
    out: dict[str, Any] = {"threshold": threshold, "source": source}
    if null is not None and len(null):
        out.update({"null_n": int(len(null)), "null_above": int((null > threshold).sum()), "null": _summary(null)})
    return out


@dataclass
class NullCalibration:
    """Thresholds calibrated on the null (real images that are not copies) and where they came from."""

    thresholds: dict[str, dict[str, Any]]
    """{"copy_similarity": {...}, "feature_cosine": {...}}, each as `calibrate` returns it."""
    kind: str
    """hold-out, leave-one-out or none (fixed fallbacks)."""
    note: str
    n_null: int

    @property
    def copy_threshold(self) -> float:
        return float(self.thresholds["copy_similarity"]["threshold"])

    @property
    def feature_threshold(self) -> float:
        return float(self.thresholds["feature_cosine"]["threshold"])


def is_flagged(copy_sim: float, feat_sim: float, copy_threshold: float, feature_threshold: float,
               flag_by_features: bool) -> bool:
    """The one flag rule: above the copy-similarity threshold, or (pretrained features only) the feature one."""
    return bool(copy_sim > copy_threshold or (flag_by_features and feat_sim > feature_threshold))


def calibrate_null(train_feats: np.ndarray, train_px: np.ndarray, train_paths: list[Path], *,
                   holdout_feats: np.ndarray | None = None, holdout_paths: list[Path] | None = None,
                   holdout_source: str = "hold-out", search: CopySearch, candidates: int = 10, quantile: float = 0.99,
                   feature_threshold: float | None = None, copy_threshold: float | None = None,
                   null_images: int = 1000, images: DecodedImageCache | None = None,
                   device: str = "cpu") -> NullCalibration:
    """Both thresholds from the null: hold-outs against the training set when there are at least
    `MIN_NULL`, else leave-one-out within the training set, else the fixed fallbacks.
    `train_px`: the training images at `search.size` (N x S x S in [0, 1])."""
    n_hold = len(holdout_paths or [])
    rng = np.random.default_rng(0)
    null: Nearest | None = None
    if n_hold >= MIN_NULL:
        use = np.sort(rng.choice(n_hold, null_images, replace=False)) if n_hold > null_images else np.arange(n_hold)
        null_kind, null_note = "hold-out", f"{n_hold} real images not in the training set ({holdout_source})"
        hold_paths = [list(holdout_paths or [])[i] for i in use]
        null = nearest_training(np.asarray(holdout_feats)[use], load_gray_stack(hold_paths, search.size, images),
                                train_feats, train_px, search, candidates, device=device,
                                description="memorization null (hold-outs)")
    elif len(train_paths) > MIN_NULL:
        n_train = len(train_paths)
        use = np.sort(rng.choice(n_train, null_images, replace=False)) if n_train > null_images else np.arange(n_train)
        null_kind = "leave-one-out"
        null_note = ((f"only {n_hold} real hold-out image(s) (fewer than {MIN_NULL})" if n_hold else "no real hold-out images")
                     + ": leave-one-out, each training image against the other training images. This assumes one image "
                     "per patient; repeat images of a patient raise the thresholds (fewer flags)")
        null = nearest_training(np.asarray(train_feats)[use], train_px[use], train_feats, train_px, search, candidates,
                                exclude=use, device=device, description="memorization null (leave-one-out)")
    else:
        null_kind = "none"
        null_note = (f"{n_hold} hold-out and {len(train_paths)} training image(s): too few to calibrate on (at least "
                     f"{MIN_NULL} hold-outs, or {MIN_NULL + 1} training images, are needed); fixed fallback thresholds")
    if null is not None and len(null.copy_sim) < (n_hold if null_kind == "hold-out" else len(train_paths)):
        null_note += f" (a random {len(null.copy_sim)} of them)"
    thresholds = {
        "copy_similarity": calibrate(null.copy_sim if null else None, quantile, copy_threshold,
                                     FALLBACK_THRESHOLDS["copy_similarity"]),
        "feature_cosine": calibrate(null.feat_sim if null else None, quantile, feature_threshold,
                                    FALLBACK_THRESHOLDS["feature_cosine"]),
    }
    return NullCalibration(thresholds, null_kind, null_note, int(len(null.copy_sim)) if null is not None else 0)


def memorization_check(fake_feats: np.ndarray, train_feats: np.ndarray, fake_paths: list[Path], train_paths: list[Path],
                       *, holdout_feats: np.ndarray | None = None, holdout_paths: list[Path] | None = None,
                       holdout_source: str = "hold-out", search: CopySearch | None = None, candidates: int = 10,
                       quantile: float = 0.99, feature_threshold: float | None = None,
                       copy_threshold: float | None = None, flag_by_features: bool = True, null_images: int = 1000,
                       top_pairs: int = 8, pairs_dir: Path | None = None, flagged_file: Path | None = None,
                       images: DecodedImageCache | None = None, device: str = "cpu") -> dict[str, Any]:
    """Nearest training image per synthetic image by features and by copy similarity; calibrated flags.

    The null comes from `holdout_*` (real images not in the training set) when given, else from the
    training set leave-one-out. `flag_by_features`: False for random-weight extractors, whose cosines
    are reported but flag nothing (they mostly measure noise). At most `null_images` (a seeded random
    subset) form the null. `images` is the run's decoded-image cache. With more than `FLAGGED_INLINE`
    flagged images, all of them are written to `flagged_file` (JSONL, one compact line each), so a
    release filter can remove every one; the result gives its name (it belongs beside the results JSON).
    """
    if len(fake_feats) == 0 or len(train_feats) == 0:
        raise EvaluationError("memorization needs at least one synthetic and one training image")
    search = search or CopySearch()
    # 1. the null: real images that are not copies, against the training set
    train_px = load_gray_stack(train_paths, search.size, images)
    cal = calibrate_null(train_feats, train_px, train_paths, holdout_feats=holdout_feats, holdout_paths=holdout_paths,
                         holdout_source=holdout_source, search=search, candidates=candidates, quantile=quantile,
                         feature_threshold=feature_threshold, copy_threshold=copy_threshold, null_images=null_images,
                         images=images, device=device)
    thresholds, null_kind, null_note = cal.thresholds, cal.kind, cal.note
    t_copy, t_feat = cal.copy_threshold, cal.feature_threshold

    # 2. the synthetic images
    fake_px = load_gray_stack(fake_paths, search.size, images)
    near = nearest_training(fake_feats, fake_px, train_feats, train_px, search, candidates, device=device,
                            description="memorization (synthetic)")
    _, meta = search.warps()

    # 3. flags and the most similar pairs (by copy similarity; ties broken by features)
    pairs = []
    for i in range(len(fake_paths)):
        pairs.append({
            "synthetic": str(fake_paths[i]),
            "nearest_by_feature": str(train_paths[near.feat_nn[i]]), "feature_cosine": float(near.feat_sim[i]),
            "nearest_by_copy": str(train_paths[near.copy_nn[i]]), "copy_similarity": float(near.copy_sim[i]),
            "alignment": {**meta[near.warp[i]], "shift_px": [int(v) for v in near.shift[i]]},
            "flagged": is_flagged(near.copy_sim[i], near.feat_sim[i], t_copy, t_feat, flag_by_features),
        })
    order = sorted(range(len(pairs)), key=lambda i: (-pairs[i]["copy_similarity"], -pairs[i]["feature_cosine"]))
    top = [pairs[i] for i in order[:top_pairs]]
    if pairs_dir is not None:
        for rank, pair in enumerate(top, 1):
            name = f"pair_{rank:02d}_copy{pair['copy_similarity']:.3f}_cos{pair['feature_cosine']:.3f}.png"
            pair["image"] = str(save_pair(Path(pair["synthetic"]), Path(pair["nearest_by_copy"]), Path(pairs_dir) / name,
                                          images=images))
    flagged = [p for p in pairs if p["flagged"]]
    covered = search.describe()
    feature_rule = (f" and feature cosine <= {t_feat:.4f}" if flag_by_features else
                    " (feature cosines are reported but flag nothing: the extractor has random weights)")
    not_flagged = (
        f"Not flagged means: copy similarity to the nearest training image <= {t_copy:.4f}{feature_rule}. "
        f"Thresholds: copy similarity {thresholds['copy_similarity']['source']}, feature cosine "
        f"{thresholds['feature_cosine']['source']}; null: {null_note}. The copy similarity looks through: "
        + "; ".join(covered["covered"]) + ". Not covered: " + "; ".join(covered["not_covered"]) + ".")
    return {
        "n_synthetic": len(fake_paths), "n_train": len(train_paths),
        "feature_cosine": _summary(near.feat_sim), "copy_similarity": _summary(near.copy_sim),
        "calibration": {"null": null_kind, "note": null_note, "quantile": quantile,
                        "n_null": cal.n_null},
        "thresholds": thresholds, "flag_by_features": flag_by_features, "search": covered, "candidates": {"by_feature": candidates, "by_thumbnail": candidates},
        "not_flagged_means": not_flagged,
        "n_flagged": len(flagged), "flagged_fraction": len(flagged) / len(pairs),
        "flagged": flagged[:FLAGGED_INLINE], "top_pairs": top,
        "flagged_file": _write_flagged(flagged, flagged_file) if len(flagged) > FLAGGED_INLINE else None,
        "pairs_dir": str(pairs_dir) if pairs_dir is not None else None,
    }


def _write_flagged(flagged: list[dict[str, Any]], path: Path | None) -> str | None:
    """Every flagged pair, one compact JSON line each (atomically); the file's name, or None without a path."""
    if path is None:
        log.warning("%d images flagged: the results list the first %d (pass flagged_file to list all)",
                    len(flagged), FLAGGED_INLINE)
        return None
    import json

    from synthcxr.fileio import atomic_write_text

    keys = ("synthetic", "nearest_by_copy", "copy_similarity", "nearest_by_feature", "feature_cosine")
    atomic_write_text(path, "".join(json.dumps({k: p[k] for k in keys}) + "\n" for p in flagged))
    return Path(path).name
