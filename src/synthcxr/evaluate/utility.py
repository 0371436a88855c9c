"""Downstream utility: do synthetic images help a tuberculosis-vs-normal classifier?

A small ResNet-18 (torchvision; random init or a local state dict) is trained on real training
images, on synthetic images, and on both, and each is scored by ROC AUC on a real held-out test set
split at the patient level (one patient's images never sit on both sides). The split is saved.

Conditioning fidelity: the classifier trained on real images labels the synthetic images made for
"tuberculosis" and for "normal"; agreement with the label each image was generated for says whether
the generator follows its conditioning. The same is done for sex when both sets know it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from synthcxr.config import StrictModel
from synthcxr.errors import EvaluationError, ModelError
from synthcxr.evaluate.imagecache import DecodedImageCache
from synthcxr.evaluate.images import ImageItem, load_gray_stack
from synthcxr.fileio import atomic_write_json
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)

TARGETS = {"label": ("normal", "tuberculosis"), "sex": ("female", "male")}


class UtilityConfig(StrictModel):
    """Classifier settings; defaults are sized for a CPU (128 px, 3 epochs)."""

    image_size: int = Field(128, ge=32)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = 1e-3
    weights: Path | None = None
    """Local ResNet-18 state dict (e.g. ImageNet); random init when unset (no downloads)."""
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    """Share of patients (per label) held out when no --test set is given."""
    sex: bool = True
    """Also train a sex classifier for conditioning fidelity when sex is known on both sides."""
    n_boot: int = Field(200, ge=0)


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


def _targets(items: list[ImageItem], attr: str) -> tuple[list[ImageItem], np.ndarray]:
    neg, pos = TARGETS[attr]
    kept = [it for it in items if getattr(it, attr) in (neg, pos)]
    return kept, np.array([1.0 if getattr(it, attr) == pos else 0.0 for it in kept], dtype=np.float32)


def _build_model(cfg: UtilityConfig, device: str):
    import torch
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


def train_classifier(x: np.ndarray, y: np.ndarray, cfg: UtilityConfig, device: str, seed: int, what: str):
    """A few epochs of AdamW on BCE with positive-class weighting (TB sets are imbalanced)."""
    import torch

    torch.manual_seed(seed)
    net = _build_model(cfg, device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    pos = float(y.sum())
    pos_weight = torch.tensor([(len(y) - pos) / max(pos, 1.0)], device=device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    rng = np.random.default_rng(seed)
    steps = cfg.epochs * int(np.ceil(len(x) / cfg.batch_size))
    net.train()
    with progress_bar(steps, f"classifier: {what}") as (progress, task):
        for _epoch in range(cfg.epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on one image
                    progress.update(task, advance=1)
                    continue
                logits = net(_to_input(x[idx], device)).squeeze(1)
                loss = loss_fn(logits, torch.from_numpy(y[idx]).to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                progress.update(task, advance=1)
    return net.eval()


def predict(net, x: np.ndarray, device: str, batch_size: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            out.append(torch.sigmoid(net(_to_input(x[start:start + batch_size], device)).squeeze(1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def auc_with_ci(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    value = float(roc_auc_score(y, p))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            boots.append(roc_auc_score(y[idx], p[idx]))
    alpha = (1 - level) / 2
    ci = [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))] if boots else [value, value]
    return {"auc": value, "ci": ci, "n_test": int(len(y)), "n_test_positive": int(y.sum())}


def _need_both_classes(y: np.ndarray, what: str, attr: str) -> None:
    neg, pos = TARGETS[attr]
    if len(y) < 4 or y.sum() < 2 or (len(y) - y.sum()) < 2:
        raise EvaluationError(
            f"utility: {what} needs at least 2 {neg!r} and 2 {pos!r} images, got {int(len(y) - y.sum())} and {int(y.sum())}",
            fix="add labelled images, or leave utility out of `metrics`",
        )


def utility_check(train_items: list[ImageItem], test_items: list[ImageItem] | None, fake_items: list[ImageItem],
                  cfg: UtilityConfig, *, device: str, seed: int, split_path: Path | None,
                  images: DecodedImageCache | None = None) -> dict[str, Any]:
    """AUC of real / synthetic / both-trained classifiers on real test images, and conditioning fidelity.

    `images` is the run's decoded-image cache (files already decoded for other metrics are not decoded again).
    """
    # 1. real train/test at patient level (saved, so the numbers can be reproduced)
    train_items, _ = _targets(train_items, "label")
    if test_items is None:
        train_items, test_items = patient_split(train_items, cfg.test_fraction, seed)
        split_source = f"patient-level split of the training set (test_fraction={cfg.test_fraction}, seed={seed})"
    else:
        test_items, _ = _targets(test_items, "label")
        split_source = "given --test set"
    train_patients = {it.patient_id for it in train_items}
    overlap = sorted(train_patients & {it.patient_id for it in test_items} - {None})
    if overlap:
        log.warning("utility: %d patient(s) appear in both the training and the test images (e.g. %s)", len(overlap), overlap[0])
    if split_path is not None:
        atomic_write_json(split_path, {
            "source": split_source, "seed": seed,
            "train": [{"path": str(it.path), "patient_id": it.patient_id, "label": it.label} for it in train_items],
            "test": [{"path": str(it.path), "patient_id": it.patient_id, "label": it.label} for it in test_items],
        })
    tr_items, y_tr = _targets(train_items, "label")
    te_items, y_te = _targets(test_items, "label")
    fk_items, y_fk = _targets(fake_items, "label")
    _need_both_classes(y_tr, "the real training set", "label")
    _need_both_classes(y_te, "the real test set", "label")

    size = cfg.image_size
    x_tr = load_gray_stack([it.path for it in tr_items], size, images)
    x_te = load_gray_stack([it.path for it in te_items], size, images)
    x_fk = load_gray_stack([it.path for it in fk_items], size, images)

    # 2. three classifiers, one real test set
    results: dict[str, Any] = {"split": {"source": split_source, "file": str(split_path) if split_path else None,
                                         "n_train": len(tr_items), "n_test": len(te_items)},
                               "image_size": size, "epochs": cfg.epochs, "classifier": "torchvision resnet18",
                               "weights": str(cfg.weights) if cfg.weights else "random init"}
    variants: dict[str, tuple[np.ndarray, np.ndarray]] = {"real": (x_tr, y_tr)}
    have_fake = len(y_fk) >= 4 and 2 <= y_fk.sum() <= len(y_fk) - 2
    if have_fake:
        variants["synthetic"] = (x_fk, y_fk)
        variants["real+synthetic"] = (np.concatenate([x_tr, x_fk]), np.concatenate([y_tr, y_fk]))
    else:
        results["note"] = "synthetic images lack labels for both classes (need a generation manifest with label): trained on real only"
    nets = {}
    for name, (x, y) in variants.items():
        nets[name] = train_classifier(x, y, cfg, device, seed, f"{name} ({len(y)} images)")
        results[name] = {"n_train": int(len(y)), "n_train_positive": int(y.sum()),
                         **auc_with_ci(y_te, predict(nets[name], x_te, device), cfg.n_boot, seed)}

    # 3. conditioning fidelity: the real-trained classifier reads the synthetic images
    if len(y_fk):
        results["conditioning"] = {"label": _agreement(predict(nets["real"], x_fk, device), y_fk, "label")}
    if cfg.sex:
        results.setdefault("conditioning", {})["sex"] = _sex_agreement(train_items, fake_items, cfg, device, seed, images)
    return results


def _agreement(prob: np.ndarray, y: np.ndarray, attr: str) -> dict[str, Any]:
    pred = (prob >= 0.5).astype(np.float32)
    out: dict[str, Any] = {"overall": float((pred == y).mean()), "n": int(len(y))}
    for value, name in enumerate(TARGETS[attr]):
        mask = y == value
        if mask.any():
            out[name] = {"n": int(mask.sum()), "agreement": float((pred[mask] == value).mean())}
    return out


def _sex_agreement(train_items: list[ImageItem], fake_items: list[ImageItem], cfg: UtilityConfig, device: str, seed: int,
                   images: DecodedImageCache | None = None) -> dict[str, Any]:
    tr_items, y_tr = _targets(train_items, "sex")
    fk_items, y_fk = _targets(fake_items, "sex")
    if len(y_fk) == 0 or len(y_tr) < 4 or y_tr.sum() < 2 or len(y_tr) - y_tr.sum() < 2:
        return {"skipped": "sex is not known for enough real training images and synthetic images"}
    net = train_classifier(load_gray_stack([it.path for it in tr_items], cfg.image_size, images), y_tr, cfg, device, seed, "sex")
    prob = predict(net, load_gray_stack([it.path for it in fk_items], cfg.image_size, images), device)
    return _agreement(prob, y_fk, "sex")
