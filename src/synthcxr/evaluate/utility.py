"""Downstream utility and conditioning fidelity: do synthetic images help a TB-vs-normal classifier,
and does the generator draw tuberculosis when asked?

Protocol (stated in the results, because each rule answers an audit finding):
- Real images are split at the patient level into train / validation / test (a saved split, or one
  made here and saved); the test patients are never trained on and are the only AUC measurement set.
- A classifier (ResNet-18 or a small CNN) is trained on real, synthetic and real+synthetic images
  with the **same optimizer-step budget** (so adding images never means training longer: with fixed
  epochs, exact copies of the real images "raised" AUC from 0.68 to 0.90) and early stopping on the
  real validation images.
- Each variant is trained with several seeds; the CI is a bootstrap over seeds *and* test images
  (the mean AUC's uncertainty from training and from the test sample), and so are the differences.
- Conditioning fidelity is threshold-free: the AUC of the real-trained classifier's score against the
  label each synthetic image was generated for, plus balanced accuracy at a threshold chosen on the
  real validation images. A classifier that calls every image one class is reported as collapsed
  (at a fixed 0.5 threshold "agreement" then only equals the share of that class).
Numbers that cannot be computed (one-class or unlabelled synthetic sets) are not printed: the result
says what is missing instead.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from synthcxr.config import StrictModel
from synthcxr.data.labels import LABELS, accepted_text
from synthcxr.errors import EvaluationError, ModelError
from synthcxr.evaluate.imagecache import DecodedImageCache
from synthcxr.evaluate.images import ImageItem, load_gray_stack
from synthcxr.fileio import atomic_write_json
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)

TARGETS = {"label": LABELS, "sex": ("female", "male")}
MIN_PER_CLASS = 2
"""Images of each class a classifier needs to be trained (or tested) at all."""


class UtilityConfig(StrictModel):
    """Classifier settings; defaults are sized for a CPU (128 px, ResNet-18, 5 seeds)."""

    image_size: int = Field(128, ge=16)
    classifier: Literal["resnet18", "small"] = "resnet18"
    """`resnet18` (torchvision); `small`: a 3-layer CNN for quick checks and tests."""
    epochs: int = Field(3, ge=1)
    """Step budget in passes over the real training images. Every classifier (real, synthetic,
    real+synthetic) gets this same number of optimizer steps (equal samples seen)."""
    steps: int | None = Field(None, ge=1)
    """The step budget set directly (overrides `epochs`)."""
    batch_size: int = Field(16, ge=2)
    lr: float = 1e-3
    weights: Path | None = None
    """Local ResNet-18 state dict (e.g. ImageNet); random init when unset (no downloads)."""
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    """Share of patients (per label) held out for testing when neither --test nor a split is given."""
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of the real training patients (per label) held out for early stopping and the threshold."""
    eval_every: int | None = Field(None, ge=1)
    """Steps between validation checks (default: one pass over the real training images)."""
    patience: int = Field(3, ge=1)
    """Validation checks without improvement before training stops (the best state is kept)."""
    seeds: int = Field(5, ge=1)
    """Training seeds per classifier; the CI covers training (seed) and test-sample variation."""
    sex: bool = True
    """Also train a sex classifier for conditioning fidelity when sex is known on both sides."""
    n_boot: int = Field(200, ge=0)
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    min_test_per_class: int = Field(20, ge=1)
    """Fewer real test images of either class than this gives a warning (differences are noise)."""


# ---------------------------------------------------------------------------------------------
# splits and labels


def patient_split(items: list[ImageItem], test_fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """Label-stratified split of patients; every image of a patient goes to the same side."""
    by_patient: dict[str, list[ImageItem]] = defaultdict(list)
    for it in items:
        by_patient[it.patient_id or str(it.path)].append(it)
    by_label: dict[str, list[str]] = defaultdict(list)
    for pid, its in sorted(by_patient.items()):
        by_label[str(its[0].label)].append(pid)
    rng = np.random.default_rng(seed)
    test_ids: set[str] = set()
    for _label, pids in sorted(by_label.items()):
        pids = list(pids)
        rng.shuffle(pids)
        n_test = int(round(test_fraction * len(pids)))
        if len(pids) >= 2:
            n_test = min(max(n_test, 1), len(pids) - 1)
        test_ids.update(pids[:n_test])
    train = [it for pid, its in sorted(by_patient.items()) if pid not in test_ids for it in its]
    test = [it for pid, its in sorted(by_patient.items()) if pid in test_ids for it in its]
    return train, test


def items_by_split(items: list[ImageItem], split_file: Path) -> dict[str, list[ImageItem]]:
    """{'train','val','test'} -> the images a saved data-layer split assigns there (by record id)."""
    from synthcxr.data.splits import SPLITS, read_split

    assignment = read_split(Path(split_file))
    missing = [it for it in items if it.key not in assignment]
    if missing:
        raise EvaluationError(
            f"{len(missing)} of the {len(items)} real training image(s) are not in the saved split "
            f"(e.g. {missing[0].key or missing[0].path})", file=split_file,
            fix="pass as --train the data set the split was made from (the training run's data.path)")
    return {side: [it for it in items if assignment[it.key] == side] for side in SPLITS}


def check_labels(items: list[ImageItem], what: str) -> None:
    """Every label must be one of the vocabulary's classes (readers normalise spellings already)."""
    bad = [it for it in items if it.label is not None and it.label not in LABELS]
    if bad:
        values = sorted({str(it.label) for it in bad})
        raise EvaluationError(f"utility: {len(bad)} {what} image(s) have unknown label(s) {values} (e.g. {bad[0].path})",
                              file=bad[0].path, fix=f"use the accepted spellings ({accepted_text()})")


def _targets(items: list[ImageItem], attr: str) -> tuple[list[ImageItem], np.ndarray]:
    neg, pos = TARGETS[attr]
    kept = [it for it in items if getattr(it, attr) in (neg, pos)]
    return kept, np.array([1.0 if getattr(it, attr) == pos else 0.0 for it in kept], dtype=np.float32)


def _counts(y: np.ndarray) -> tuple[int, int]:
    return int(len(y) - y.sum()), int(y.sum())


def _need_both_classes(y: np.ndarray, what: str, attr: str) -> None:
    neg, pos = TARGETS[attr]
    n_neg, n_pos = _counts(y)
    if n_neg < MIN_PER_CLASS or n_pos < MIN_PER_CLASS:
        raise EvaluationError(
            f"utility: {what} needs at least {MIN_PER_CLASS} {neg!r} and {MIN_PER_CLASS} {pos!r} images, "
            f"got {n_neg} and {n_pos}",
            fix="add labelled images, or leave utility out of `metrics`",
        )


def synthetic_gap(items: list[ImageItem], attr: str = "label", need: int = MIN_PER_CLASS) -> str | None:
    """What the synthetic set lacks to train (need=2) or to score conditioning (need=1); None when nothing."""
    neg, pos = TARGETS[attr]
    counts = {v: sum(1 for it in items if getattr(it, attr) == v) for v in (neg, pos)}
    unknown = len(items) - sum(counts.values())
    if counts[neg] >= need and counts[pos] >= need:
        return None
    if not counts[neg] and not counts[pos]:
        return (f"none of the {len(items)} synthetic image(s) records its {attr} (generate from a prompts CSV with a "
                f"{attr} column{' or finding' if attr == 'label' else ''}; manifest.jsonl then keeps it)")
    missing = ", ".join(f"{need - counts[v]} more {v!r}" for v in (neg, pos) if counts[v] < need)
    return (f"the synthetic set has {counts[neg]} {neg!r} and {counts[pos]} {pos!r} image(s)"
            f"{f' (+{unknown} without {attr})' if unknown else ''}; at least {need} of each are needed: {missing}")


# ---------------------------------------------------------------------------------------------
# classifier


def _build_model(cfg: UtilityConfig, device: str):
    import torch

    if cfg.classifier == "small":
        def block(c_in: int, c_out: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]

        net = torch.nn.Sequential(*block(3, 8), *block(8, 16), *block(16, 32), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(32, 1))
        return net.to(device)
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    if cfg.weights is not None:
        path = Path(cfg.weights)
        if not path.is_file():
            raise ModelError("classifier weights not found", file=path, fix="pass a ResNet-18 state dict as utility.weights")
        state = torch.load(str(path), map_location="cpu", weights_only=False)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        net.load_state_dict(state, strict=False)
    net.fc = torch.nn.Linear(net.fc.in_features, 1)
    return net.to(device)


def _to_input(x: np.ndarray, device: str):
    import torch

    t = torch.from_numpy(x)[:, None].to(device).expand(-1, 3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    return (t - mean) / std


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless full batches from successive permutations: equal steps mean equal samples seen."""
    size = min(batch_size, n)
    pool = np.zeros(0, dtype=np.int64)
    while True:
        while len(pool) < size:
            pool = np.concatenate([pool, rng.permutation(n)])
        yield pool[:size]
        pool = pool[size:]


def train_classifier(x: np.ndarray, y: np.ndarray, cfg: UtilityConfig, device: str, seed: int, what: str, *,
                     max_steps: int, eval_every: int, val: tuple[np.ndarray, np.ndarray] | None = None):
    """AdamW on BCE (positive-class weighted: TB sets are imbalanced) for `max_steps` steps.

    With `val` (both classes present) the validation AUC is checked every `eval_every` steps; the
    best state is kept (ties: lower validation loss) and training stops after `patience` checks
    without improvement. Returns (network in eval mode, {steps, best_step, best_val_auc}).
    """
    import torch

    torch.manual_seed(seed)
    net = _build_model(cfg, device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    pos = float(y.sum())
    pos_weight = torch.tensor([(len(y) - pos) / max(pos, 1.0)], device=device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    batches = _batches(len(x), cfg.batch_size, np.random.default_rng(seed))
    best: tuple[float, float] | None = None
    best_state, best_step, checks_without_gain, step = None, None, 0, 0
    net.train()
    with progress_bar(max_steps, f"classifier: {what}") as (progress, task):
        for step in range(1, max_steps + 1):
            idx = next(batches)
            logits = net(_to_input(x[idx], device)).squeeze(1)
            loss = loss_fn(logits, torch.from_numpy(y[idx]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.update(task, advance=1)
            if val is not None and (step % eval_every == 0 or step == max_steps):
                p_val = predict(net.eval(), val[0], device)
                net.train()
                score = (float(auc_rows(val[1], p_val[None])[0]), -_bce(val[1], p_val))
                if best is None or score > best:
                    best, best_step, checks_without_gain = score, step, 0
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    checks_without_gain += 1
                    if checks_without_gain >= cfg.patience:
                        progress.update(task, completed=max_steps)
                        break
    if best_state is not None:
        net.load_state_dict(best_state)
    info = {"steps": step, "best_step": best_step if best_state is not None else step,
            "best_val_auc": best[0] if best is not None else None}
    return net.eval(), info


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def predict(net, x: np.ndarray, device: str, batch_size: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            out.append(torch.sigmoid(net(_to_input(x[start:start + batch_size], device)).squeeze(1)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# statistics over seeds and test images


def auc_rows(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of every row of `scores` (S x N) against `y` (Mann-Whitney with tied ranks)."""
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(scores, axis=1)
    return (ranks[:, pos].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def balanced_accuracy_rows(y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Balanced accuracy of every row of `scores` at its own threshold (positive when score >= threshold)."""
    pred = scores >= thresholds[:, None]
    pos = y == 1
    return 0.5 * (pred[:, pos].mean(axis=1) + (~pred[:, ~pos]).mean(axis=1))


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold with the best balanced accuracy (Youden's J) on validation scores."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], 1.0))


def _boot_draws(y: np.ndarray, n_seeds: int, n_boot: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(seed indices, image indices) per replicate: seeds resampled, images resampled within each class."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in (0, 1)]
    return [(rng.integers(0, n_seeds, n_seeds), np.concatenate([rng.choice(ix, len(ix)) for ix in by_class]))
            for _ in range(n_boot)]


def _ci(values: list[float] | np.ndarray, level: float, fallback: float) -> list[float]:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return [fallback, fallback]
    alpha = (1 - level) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def seed_stat(y: np.ndarray, scores: np.ndarray, draws: list, level: float, stat=auc_rows, **kw) -> dict[str, Any]:
    """Mean over seeds of `stat`, its seed-to-seed SD, and a CI over seeds and images."""
    per_seed = stat(y, scores, **kw)
    boots = [float(stat(y[ix], scores[s][:, ix], **_sub(kw, s)).mean()) for s, ix in draws]
    return {"value": float(per_seed.mean()), "ci": _ci(boots, level, float(per_seed.mean())),
            "sd_seeds": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0,
            "per_seed": [round(float(v), 6) for v in per_seed], "_boots": boots}


def _sub(kw: dict[str, Any], seeds: np.ndarray) -> dict[str, Any]:
    return {k: v[seeds] for k, v in kw.items()}


# ---------------------------------------------------------------------------------------------
# the check


def utility_check(train_items: list[ImageItem], test_items: list[ImageItem] | None, fake_items: list[ImageItem],
                  cfg: UtilityConfig, *, device: str, seed: int, split_path: Path | None,
                  images: DecodedImageCache | None = None, val_items: list[ImageItem] | None = None,
                  split_source: str | None = None, split_file: Path | None = None,
                  scores_path: Path | None = None) -> dict[str, Any]:
    """AUC of real / synthetic / real+synthetic classifiers on real test patients, and conditioning fidelity.

    With `split_file` (a saved data-layer split, e.g. the one the generator trained with) its train,
    val and test patients are used; else `test_items` (a --test set) or a patient-level split made
    here, saved to `split_path`. `images` is the run's decoded-image cache. `scores_path`: a CSV of
    each labelled synthetic image's score (`file,label,score`), which `export-dataset` filters on
    without retraining. Returns the results dict; its "warnings" list is for the caller.
    """
    warnings: list[str] = []
    if split_file is not None:
        if test_items is not None:
            raise EvaluationError("utility: both a --test set and a saved split are given", file=split_file,
                                  fix="leave out --test (the split's test patients are used) or the split")
        check_labels(train_items, "real training")
        sides = items_by_split(train_items, split_file)
        train_items, val_items, test_items = sides["train"], sides["val"], sides["test"]
        split_source = split_source or f"saved split {split_file} (the generator's training split)"
    check_labels(train_items, "real training")
    check_labels(test_items or [], "real test")
    check_labels(val_items or [], "real validation")
    # 1. real train / validation / test at patient level (saved, so the numbers can be reproduced)
    train_items, _ = _targets(train_items, "label")
    if test_items is None:
        train_items, test_items = patient_split(train_items, cfg.test_fraction, seed)
        split_source = split_source or f"patient-level split of the training set (test_fraction={cfg.test_fraction}, seed={seed})"
    else:
        test_items, _ = _targets(test_items, "label")
        split_source = split_source or "given --test set"
    if not val_items:
        train_items, val_items = patient_split(train_items, cfg.val_fraction, seed + 1)
    else:
        val_items, _ = _targets(val_items, "label")
    sides = {"train": train_items, "val": val_items, "test": test_items}
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        overlap = sorted({it.patient_id for it in sides[a]} & {it.patient_id for it in sides[b]} - {None})
        if overlap:
            warnings.append(f"utility: {len(overlap)} patient(s) appear in both the {a} and the {b} images (e.g. {overlap[0]})")
    if split_path is not None:
        atomic_write_json(split_path, {"source": split_source, "seed": seed, **{
            side: [{"path": str(it.path), "patient_id": it.patient_id, "label": it.label} for it in its]
            for side, its in sides.items()}})
    y_tr, y_va, y_te = (_targets(sides[s], "label")[1] for s in ("train", "val", "test"))
    fk_items, y_fk = _targets(fake_items, "label")
    _need_both_classes(y_tr, "the real training set", "label")
    _need_both_classes(y_te, "the real test set", "label")
    has_val = min(_counts(y_va)) >= 1
    if not has_val:
        warnings.append(f"utility: the real validation images ({len(y_va)}) lack a class: no early stopping, and "
                        "no threshold for balanced accuracy")

    size = cfg.image_size
    x_tr, x_va, x_te = (load_gray_stack([it.path for it in sides[s]], size, images) for s in ("train", "val", "test"))
    x_fk = load_gray_stack([it.path for it in fk_items], size, images)

    # 2. the protocol: one step budget for every variant, early stopping on real validation images
    steps_per_epoch = math.ceil(len(y_tr) / cfg.batch_size)
    max_steps = cfg.steps or cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    seeds = [seed + k for k in range(cfg.seeds)]
    n_neg_te, n_pos_te = _counts(y_te)
    results: dict[str, Any] = {
        "protocol": {
            "comparison": "equal optimizer steps (equal samples seen) for every variant",
            "max_steps": max_steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "early_stopping": (f"best validation AUC, checked every {eval_every} steps, patience {cfg.patience}"
                               if has_val else "none (validation lacks a class)"),
            "seeds": seeds, "ci": f"{cfg.ci_level:.0%} bootstrap over seeds and test images ({cfg.n_boot} replicates)",
            "threshold": "best balanced accuracy on the real validation images (per seed)" if has_val else None,
            "measured_on": "real test patients only (never trained on, never used for early stopping)",
        },
        "split": {"source": split_source, "file": str(split_path) if split_path else None,
                  "n_train": len(y_tr), "n_val": len(y_va), "n_test": len(y_te),
                  "n_test_positive": n_pos_te, "n_test_patients": len({it.patient_id for it in test_items})},
        "image_size": size, "epochs": cfg.epochs, "classifier": cfg.classifier if cfg.classifier == "small" else "torchvision resnet18",
        "weights": str(cfg.weights) if cfg.weights else "random init",
    }
    variants: dict[str, tuple[np.ndarray, np.ndarray]] = {"real": (x_tr, y_tr)}
    gap = synthetic_gap(fake_items)
    if gap is None:
        variants["synthetic"] = (x_fk, y_fk)
        variants["real+synthetic"] = (np.concatenate([x_tr, x_fk]), np.concatenate([y_tr, y_fk]))
    else:
        for name in ("synthetic", "real+synthetic"):
            results[name] = {"skipped": gap}
        warnings.append(f"utility: the synthetic and real+synthetic classifiers were not trained: {gap}")

    val = (x_va, y_va) if has_val else None
    test_scores: dict[str, np.ndarray] = {}
    real_val_scores, real_fake_scores = [], []
    for name, (x, y) in variants.items():
        runs, scores = [], []
        for k, s in enumerate(seeds):
            net, info = train_classifier(x, y, cfg, device, s, f"{name} ({len(y)} images, seed {k + 1}/{len(seeds)})",
                                         max_steps=max_steps, eval_every=eval_every, val=val)
            runs.append(info)
            scores.append(predict(net, x_te, device))
            if name == "real":
                real_val_scores.append(predict(net, x_va, device) if len(x_va) else np.zeros(0))
                real_fake_scores.append(predict(net, x_fk, device) if len(x_fk) else np.zeros(0))
        test_scores[name] = np.stack(scores)
        results[name] = {"n_train": int(len(y)), "n_train_positive": int(y.sum()), "n_test": len(y_te),
                         "n_test_positive": n_pos_te, "steps": [r["steps"] for r in runs],
                         "best_step": [r["best_step"] for r in runs]}

    draws = _boot_draws(y_te, len(seeds), cfg.n_boot, seed)
    boots: dict[str, list[float]] = {}
    for name, scores in test_scores.items():
        stat = seed_stat(y_te, scores, draws, cfg.ci_level)
        boots[name] = stat.pop("_boots")
        results[name].update({"auc": stat.pop("value"), **stat})
    for name in test_scores:
        if name == "real":
            continue
        diff = results[name]["auc"] - results["real"]["auc"]
        ci = _ci(np.subtract(boots[name], boots["real"]), cfg.ci_level, diff)
        significant = bool(boots[name]) and not (ci[0] <= 0.0 <= ci[1])  # no bootstrap (n_boot=0): never claimed
        results[name]["minus_real"] = {"value": diff, "ci": ci, "significant": significant}
    if min(n_neg_te, n_pos_te) < cfg.min_test_per_class:
        step = 1 / min(n_neg_te, n_pos_te)  # one image ranked differently moves an AUC by up to this much
        widths = [(results[n]["minus_real"]["ci"][1] - results[n]["minus_real"]["ci"][0]) / 2 for n in test_scores if n != "real"]
        spread = f", the CI of the differences spans ±{max(widths):.3f}" if widths and max(widths) > 0 else ""
        warnings.append(f"utility: the real test set has only {n_pos_te} 'tuberculosis' and {n_neg_te} 'normal' image(s) "
                        f"(fewer than {cfg.min_test_per_class} of a class): one image can move an AUC by up to {step:.3f}"
                        f"{spread}; smaller differences are not distinguishable from noise")

    # 3. conditioning fidelity: the real-trained classifier reads the synthetic images
    thresholds = np.array([choose_threshold(y_va, p) for p in real_val_scores]) if has_val else None
    if thresholds is not None:
        test_pos = (test_scores["real"] >= thresholds[:, None]).mean()
        if test_pos <= 0.02 or test_pos >= 0.98:
            warnings.append(f"utility: the real-trained classifier calls {test_pos:.0%} of the real test images "
                            "'tuberculosis' at its validation threshold: it has not learned the classes")
    label_cond, warn = conditioning(fake_items, y_fk, np.stack(real_fake_scores) if len(y_fk) else None,
                                    thresholds, "label", cfg, seed)
    warnings += warn
    if scores_path is not None and len(y_fk) and "skipped" not in label_cond:
        label_cond["scores_file"] = write_scores(scores_path, fk_items, np.stack(real_fake_scores))
        label_cond["score"] = (f"mean '{TARGETS['label'][1]}' probability of the {len(seeds)} real-trained "
                               "classifier(s), per synthetic image")
    results["conditioning"] = {"label": label_cond}
    if cfg.sex:
        sex_cond, warn = _sex_conditioning(sides["train"], sides["val"], fake_items, cfg, device, seed, images,
                                           max_steps, eval_every)
        results["conditioning"]["sex"] = sex_cond
        warnings += warn
    results["warnings"] = warnings
    return results


def write_scores(path: Path, items: list[ImageItem], scores: np.ndarray) -> str:
    """`file,label,score` CSV (score: mean over the seeds' classifiers), written atomically; returns its name."""
    import csv
    import io

    from synthcxr.fileio import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "label", "score"])
    for item, score in zip(items, scores.mean(axis=0), strict=True):
        writer.writerow([str(item.path), item.label, f"{float(score):.6f}"])
    atomic_write_text(path, buf.getvalue())
    return Path(path).name


def conditioning(fake_items: list[ImageItem], y: np.ndarray, scores: np.ndarray | None, thresholds: np.ndarray | None,
                 attr: str, cfg: UtilityConfig, seed: int) -> tuple[dict[str, Any], list[str]]:
    """AUC and balanced accuracy of the real-trained scores against the attribute each image was made for."""
    gap = synthetic_gap(fake_items, attr, need=1)
    if gap is not None or scores is None:
        return {"skipped": gap or f"no synthetic image records its {attr}"}, [f"utility: conditioning ({attr}) not measured: {gap}"]
    neg, pos = TARGETS[attr]
    draws = _boot_draws(y, len(scores), cfg.n_boot, seed + 7)
    out: dict[str, Any] = {"n": int(len(y)), f"n_{pos}": int(y.sum()), f"n_{neg}": int(len(y) - y.sum())}
    auc = seed_stat(y, scores, draws, cfg.ci_level)
    auc.pop("_boots")
    out["auc"] = auc
    warnings: list[str] = []
    if thresholds is None:
        out["balanced_accuracy"] = {"skipped": "the real validation images lack a class, so no threshold was chosen"}
        return out, warnings
    bacc = seed_stat(y, scores, draws, cfg.ci_level, stat=balanced_accuracy_rows, thresholds=thresholds)
    bacc.pop("_boots")
    out["balanced_accuracy"] = bacc
    out["thresholds"] = [round(float(t), 6) for t in thresholds]
    predicted_pos = (scores >= thresholds[:, None]).mean(axis=1)
    out[f"predicted_{pos}_fraction"] = float(predicted_pos.mean())
    for value, name in enumerate((neg, pos)):  # per-class recall, mean over seeds
        mask = y == value
        hit = (scores[:, mask] >= thresholds[:, None]) if value else (scores[:, mask] < thresholds[:, None])
        out[name] = {"n": int(mask.sum()), "recall": float(hit.mean())}
    majority = float(np.maximum(predicted_pos, 1 - predicted_pos).mean())
    out["collapsed"] = majority >= 0.95
    if out["collapsed"]:
        warnings.append(f"utility: conditioning ({attr}): the real-trained classifier calls {majority:.0%} of the synthetic "
                        f"images one class: predictions collapsed, so balanced accuracy says little; read the AUC "
                        f"({auc['value']:.3f})")
    return out, warnings


def _sex_conditioning(train_items: list[ImageItem], val_items: list[ImageItem], fake_items: list[ImageItem],
                      cfg: UtilityConfig, device: str, seed: int, images: DecodedImageCache | None,
                      max_steps: int, eval_every: int) -> tuple[dict[str, Any], list[str]]:
    tr_items, y_tr = _targets(train_items, "sex")
    va_items, y_va = _targets(val_items, "sex")
    fk_items, y_fk = _targets(fake_items, "sex")
    if min(_counts(y_tr)) < MIN_PER_CLASS:
        return {"skipped": f"sex is known for {int(len(y_tr) - y_tr.sum())} female and {int(y_tr.sum())} male real "
                           f"training image(s); at least {MIN_PER_CLASS} of each are needed"}, []
    gap = synthetic_gap(fake_items, "sex", need=1)
    if gap is not None:
        return {"skipped": gap}, []
    has_val = min(_counts(y_va)) >= 1
    x_tr = load_gray_stack([it.path for it in tr_items], cfg.image_size, images)
    x_va = load_gray_stack([it.path for it in va_items], cfg.image_size, images)
    x_fk = load_gray_stack([it.path for it in fk_items], cfg.image_size, images)
    scores, thresholds = [], []
    for k in range(cfg.seeds):
        net, _ = train_classifier(x_tr, y_tr, cfg, device, seed + k, f"sex (seed {k + 1}/{cfg.seeds})",
                                  max_steps=max_steps, eval_every=eval_every, val=(x_va, y_va) if has_val else None)
        scores.append(predict(net, x_fk, device))
        if has_val:
            thresholds.append(choose_threshold(y_va, predict(net, x_va, device)))
    return conditioning(fk_items, y_fk, np.stack(scores), np.array(thresholds) if has_val else None, "sex", cfg, seed)
