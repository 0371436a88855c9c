"""Patient re-identification: a Siamese verification network that says whether two chest X-rays show
the same patient (Packhäuser et al. 2022; CheXGenBench scores generators this way).

Shape: one backbone embeds each image; the absolute difference of the two embeddings goes through
a linear layer and a sigmoid, the probability that both images show one patient. Trained with
binary cross-entropy on pairs of the same / of different patients, sampled from training patients
only (patient-level split), with light augmentation (shift, exposure, noise) so that it recognises
the patient, not the exposure. Reported: verification AUC with a jackknife interval over held-out
patients, and two thresholds calibrated on held-out real *different-patient* pairs at a false-match
rate (default 1%):
- `pair_threshold`: the (1 - fmr) quantile of scores of random different-patient pairs;
- `search_threshold`: the (1 - fmr) quantile, over held-out images, of the *maximum* score against
  their `candidates` nearest training-patient images (by re-ID embedding): the same search that
  `evaluate --metrics reid` runs for synthetic images, so at most `fmr` of real images of unseen
  patients would be flagged by it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from synthcxr.config import StrictModel
from synthcxr.errors import DataError, ModelError
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)

Backbone = Literal["resnet50", "resnet18", "tiny"]
FORMAT_VERSION = 1


class ReidModelConfig(StrictModel):
    """The verification network's shape (saved with its weights)."""

    backbone: Backbone = "resnet50"
    """ResNet-50 as Packhäuser et al. and CheXGenBench; `resnet18` is lighter; `tiny` (a 4-layer CNN) for tests."""
    backbone_weights: Path | None = None
    """A torchvision state dict to start the backbone from (e.g. ImageNet ResNet-50 saved on a networked
    machine). Default: random initialisation (no downloads)."""
    image_size: int = Field(256, ge=16)
    """Input side in pixels (Packhäuser et al. use 256)."""


class ReidTrainConfig(StrictModel):
    """`synthcxr privacy train-reid`: what to train on and for how long."""

    model: ReidModelConfig = Field(default_factory=ReidModelConfig)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=2)
    """Pairs per step, half of the same patient and half of different patients."""
    lr: float = Field(1e-4, gt=0)
    val: float = Field(0.1, ge=0, lt=1)
    """Fraction of patients held out for choosing the best step."""
    test: float = Field(0.2, gt=0, lt=1)
    """Fraction of patients held out for the reported AUC and the thresholds."""
    eval_every: int = Field(200, ge=1)
    max_pairs: int = Field(20000, ge=10)
    """Different-patient pairs sampled for validation/test AUCs and the pair threshold."""
    fmr: float = Field(0.01, gt=0, lt=0.5)
    """False-match rate of the calibrated thresholds."""
    candidates: int = Field(10, ge=1)
    """Training-patient images searched per held-out image for the search threshold (as evaluate does)."""
    ci_level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    device: str = "auto"


# --- network ---------------------------------------------------------------------------------------


def build_backbone(cfg: ReidModelConfig):  # noqa: ANN201 - (nn.Module, embedding dim)
    import torch
    from torch import nn

    if cfg.backbone == "tiny":
        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

        # a 4 x 4 grid instead of global pooling: where things are (anatomy) is what identifies a patient
        net = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64),
                            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        return net, 64 * 16
    import torchvision

    net = torchvision.models.get_model(cfg.backbone, weights=None)
    if cfg.backbone_weights is not None:
        path = Path(cfg.backbone_weights)
        if not path.is_file():
            raise ModelError("backbone weights file not found", file=path,
                             fix=f"pass a torchvision {cfg.backbone} state dict as model.backbone_weights, or leave it unset")
        state = torch.load(str(path), map_location="cpu", weights_only=False)
        state = state.state_dict() if isinstance(state, nn.Module) else state
        missing, _ = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")]:
            raise ModelError(f"weights do not fit torchvision {cfg.backbone} (missing {missing[:3]})", file=path,
                             fix=f"pass a state dict saved from torchvision.models.{cfg.backbone}")
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _reid_net(cfg: ReidModelConfig):  # noqa: ANN202
    from torch import nn

    class ReidNet(nn.Module):
        """Siamese verifier: sigmoid(w . |f(a) - f(b)| + c) is P(same patient)."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone, dim = build_backbone(cfg)
            self.head = nn.Linear(dim, 1)

        def embed(self, x):  # noqa: ANN001, ANN202 - N x 1 x S x S in [0, 1]
            return self.backbone(((x - 0.5) / 0.25).expand(-1, 3, -1, -1))

        def logits(self, ea, eb):  # noqa: ANN001, ANN202
            return self.head((ea - eb).abs()).squeeze(-1)

        def forward(self, a, b):  # noqa: ANN001, ANN202
            return self.logits(self.embed(a), self.embed(b))

    return ReidNet()


@dataclass
class ReidModel:
    """A trained verifier with its calibration, as saved by `train_reid`."""

    net: Any
    cfg: ReidModelConfig
    calibration: dict[str, Any]
    device: str

    def embed(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """N x S x S float32 [0, 1] -> N x D embeddings."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).float().unsqueeze(1)
                out.append(self.net.embed(x.to(self.device)).float().cpu().numpy())
        dim = self.net.head.in_features
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def score(self, ea: np.ndarray, eb: np.ndarray) -> np.ndarray:
        """P(same patient) for row-aligned embedding pairs."""
        import torch

        with torch.inference_mode():
            logits = self.net.logits(torch.from_numpy(ea).to(self.device), torch.from_numpy(eb).to(self.device))
        return torch.sigmoid(logits).float().cpu().numpy()


def save_reid(path: Path, net, cfg: ReidModelConfig, calibration: dict[str, Any]) -> Path:  # noqa: ANN001
    import io

    import torch

    from synthcxr.fileio import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, "model": cfg.model_dump(mode="json"), "calibration": calibration,
                "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_reid(path: str | Path, device: str = "cpu") -> ReidModel:
    """A network saved by `synthcxr privacy train-reid` (its reid.pt; a run folder is accepted)."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / "reid.pt"
    fix = "train one with `synthcxr privacy train-reid --data SET --out DIR` and pass DIR/reid.pt"
    if not path.is_file():
        raise ModelError("re-identification network not found", file=path, fix=fix)
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=False)
        cfg = ReidModelConfig(**{**saved["model"], "backbone_weights": None})
        net = _reid_net(cfg)
        net.load_state_dict(saved["state_dict"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ModelError(f"not a re-identification network file ({type(exc).__name__}: {exc})", file=path, fix=fix) from None
    return ReidModel(net.eval().to(device), cfg, saved.get("calibration", {}), device)


# --- data ------------------------------------------------------------------------------------------


def load_record_images(records: list, size: int) -> np.ndarray:  # noqa: ANN001 - XrayRecord
    """N x size x size uint8 (the evaluate decoding for files; DICOM pixels through the data layer)."""
    from synthcxr.data.preprocess import load_image
    from synthcxr.evaluate.images import load_gray

    out = np.zeros((len(records), size, size), np.uint8)
    with progress_bar(len(records), "re-ID images") as (progress, task):
        for i, record in enumerate(records):
            if record.image_path is not None and record.pixels is None and record.extra.get("format") != "dicom":
                gray = load_gray(record.image_path, size)
            else:
                gray = np.asarray(load_image(record, size), np.float32)[..., 0] / 255.0
            out[i] = np.round(gray * 255).astype(np.uint8)
            progress.advance(task)
    return out


def _augment(x, gen):  # noqa: ANN001, ANN202 - B x 1 x S x S in [0, 1]
    """Shift up to 6% of the side, exposure and contrast +-10%, noise: what differs between visits."""
    import torch

    b, _, s, _ = x.shape
    pad = max(1, round(0.06 * s))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    bias = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.1
    noise = torch.randn(out.shape, generator=gen) * 0.02
    return (out * gain + bias + noise).clamp(0, 1)


def patient_groups(patients: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    return groups


def evaluation_pairs(patients: list[str], max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pairs N x 2 of image indices, same-patient 0/1): every same-patient pair (up to max_pairs) and
    up to max_pairs random different-patient pairs."""
    rng = np.random.default_rng(seed)
    groups = patient_groups(patients)
    pos = [(a, b) for idx in groups.values() for k, a in enumerate(idx) for b in idx[k + 1:]]
    if len(pos) > max_pairs:
        pos = [pos[i] for i in rng.choice(len(pos), max_pairs, replace=False)]
    n = len(patients)
    neg: set[tuple[int, int]] = set()
    total_neg = n * (n - 1) // 2 - sum(len(v) * (len(v) - 1) // 2 for v in groups.values())
    want = min(max_pairs, total_neg)
    while len(neg) < want:
        a, b = (int(v) for v in rng.integers(0, n, 2))
        if patients[a] != patients[b]:
            neg.add((min(a, b), max(a, b)))
    pairs = np.array(pos + sorted(neg), dtype=np.int64).reshape(-1, 2)
    return pairs, np.array([1] * len(pos) + [0] * len(neg))


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def auc_with_interval(pairs: np.ndarray, labels: np.ndarray, scores: np.ndarray, patients: list[str],
                      level: float = 0.95, groups: int = 20, seed: int = 0) -> dict[str, Any]:
    """Verification AUC with a delete-a-group jackknife interval over patients (pairs of one patient are
    not independent: a group of patients and every pair touching them is left out at a time)."""
    import scipy.stats

    auc = _auc(labels, scores)
    ids = sorted(set(patients))
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(len(ids)), min(len(ids), groups))
    pid = np.array([ids.index(p) for p in patients])
    thetas = []
    for part in parts:
        drop = np.isin(pid[pairs[:, 0]], part) | np.isin(pid[pairs[:, 1]], part)
        keep_labels = labels[~drop]
        if keep_labels.min(initial=1) == keep_labels.max(initial=0):
            continue  # a replicate without both kinds of pairs has no AUC
        thetas.append(_auc(keep_labels, scores[~drop]))
    g = len(thetas)
    if g < 2:
        return {"value": auc, "ci": None, "se": None, "n_patients": len(ids)}
    theta = np.asarray(thetas)
    se = float(np.sqrt((g - 1) / g * ((theta - theta.mean()) ** 2).sum()))
    t = float(scipy.stats.t.ppf(0.5 + level / 2, g - 1))
    return {"value": auc, "ci": [max(0.0, auc - t * se), min(1.0, auc + t * se)], "se": se, "n_patients": len(ids),
            "n_same_pairs": int(labels.sum()), "n_different_pairs": int((1 - labels).sum()),
            "ci_method": f"delete-a-group jackknife over patients ({g} groups), t with {g - 1} df"}


def nearest_candidates(query: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """Indices (N x k) of the k pool embeddings with the highest cosine similarity to each query."""
    k = min(k, len(pool))
    qn = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    pn = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    out = np.zeros((len(query), k), np.int64)
    for start in range(0, len(query), 256):
        sims = qn[start:start + 256] @ pn.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1)
        out[start:start + 256] = np.take_along_axis(top, order, 1)
    return out


def search_scores(model: ReidModel, query: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query embedding: (scores N x k, pool indices N x k) of its k nearest pool images, best first."""
    cand = nearest_candidates(query, pool, k)
    scores = model.score(np.repeat(query, cand.shape[1], axis=0), pool[cand.ravel()]).reshape(cand.shape)
    order = np.argsort(-scores, axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)


# --- training --------------------------------------------------------------------------------------


def split_patients(patients: list[str], val: float, test: float, seed: int) -> dict[str, str]:
    """patient -> train/val/test; only patients with two or more images can give same-patient pairs, so
    they are shared out first (each held-out set gets at least two when there are enough)."""
    groups = patient_groups(patients)
    multi = sorted(p for p, idx in groups.items() if len(idx) > 1)
    single = sorted(p for p, idx in groups.items() if len(idx) == 1)
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for ids, floor in ((multi, 2), (single, 0)):
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_test = max(floor, round(len(ids) * test))
        n_val = max(floor, round(len(ids) * val)) if val > 0 else 0
        for i, p in enumerate(ids):
            out[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    if sum(1 for p in multi if out[p] == "train") < 2:
        raise DataError(f"only {len(multi)} patient(s) have two or more images: too few to train and test a "
                        "patient-verification network",
                        fix="use a data set with follow-up images (NIH ChestX-ray14, CheXpert, MIMIC-CXR), and give "
                            "the folder layout's manifest a patient_id column")
    return out


def train_reid(records: list, cfg: ReidTrainConfig, out_dir: Path) -> dict[str, Any]:  # noqa: ANN001
    """Train on the records' training patients, report on held-out ones, save `reid.pt` and `reid.json`."""
    import torch

    from synthcxr.evaluate.features import resolve_device
    from synthcxr.fileio import atomic_write_json

    started = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. patient-level split
    patients = [f"{r.source}/{r.patient_id}" for r in records]
    side = split_patients(patients, cfg.val, cfg.test, cfg.seed)
    index = {s: [i for i, p in enumerate(patients) if side[p] == s] for s in ("train", "val", "test")}
    train_groups = [idx for idx in patient_groups([patients[i] for i in index["train"]]).values()]
    train_groups = [[index["train"][j] for j in g] for g in train_groups]
    multi = [g for g in train_groups if len(g) > 1]
    log.info("re-ID split: %d/%d/%d patients (train/val/test), %d training patients with follow-up images",
             *(len({patients[i] for i in index[s]}) for s in ("train", "val", "test")), len(multi))

    # 2. images, once, at the network's size
    images = load_record_images(records, cfg.model.image_size)
    tensor = torch.from_numpy(images)

    def batch(idx: np.ndarray):  # noqa: ANN202
        return tensor[torch.from_numpy(idx)].float().div(255.0).unsqueeze(1)

    # 3. network, optimiser
    net = _reid_net(cfg.model).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model = ReidModel(net, cfg.model, {}, device)

    def held_out_auc(split: str, seed: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, list[str]]:
        ids = index[split]
        pats = [patients[i] for i in ids]
        pairs, labels = evaluation_pairs(pats, cfg.max_pairs, seed)
        net.eval()
        emb = model.embed(images[ids].astype(np.float32) / 255.0)
        scores = model.score(emb[pairs[:, 0]], emb[pairs[:, 1]])
        net.train()
        return auc_with_interval(pairs, labels, scores, pats, cfg.ci_level, seed=seed), pairs, labels, scores, pats

    # 4. training steps: half same-patient pairs, half different-patient pairs
    half = cfg.batch_size // 2
    best = (-1.0, 0, None)
    net.train()
    with progress_bar(cfg.steps, "training re-ID") as (progress, task):
        for step in range(1, cfg.steps + 1):
            same = [rng.choice(multi[int(rng.integers(len(multi)))], 2, replace=False) for _ in range(half)]
            diff = []
            while len(diff) < cfg.batch_size - half:
                ga, gb = rng.integers(len(train_groups), size=2)
                if ga != gb:
                    diff.append((rng.choice(train_groups[ga]), rng.choice(train_groups[gb])))
            pairs = np.array([*same, *diff], dtype=np.int64)
            target = torch.tensor([1.0] * half + [0.0] * len(diff), device=device)
            a = _augment(batch(pairs[:, 0]), gen).to(device)
            b = _augment(batch(pairs[:, 1]), gen).to(device)
            loss = loss_fn(net(a, b), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.advance(task)
            if index["val"] and (step % cfg.eval_every == 0 or step == cfg.steps):
                val_auc = held_out_auc("val", cfg.seed + 1)[0]["value"]
                log.info("step %d: loss %.4f, validation AUC %.4f", step, loss.item(), val_auc)
                if val_auc > best[0]:
                    best = (val_auc, step, {k: v.detach().clone() for k, v in net.state_dict().items()})
    if best[2] is not None:
        net.load_state_dict(best[2])

    # 5. held-out patients: AUC and the two calibrated thresholds
    test_auc, pairs, labels, scores, _ = held_out_auc("test", cfg.seed + 2)
    different = scores[labels == 0]
    q = 1.0 - cfg.fmr
    net.eval()
    test_emb = model.embed(images[index["test"]].astype(np.float32) / 255.0)
    pool_emb = model.embed(images[index["train"]].astype(np.float32) / 255.0)
    best_scores, _ = search_scores(model, test_emb, pool_emb, cfg.candidates)
    search_null = best_scores[:, 0]
    calibration = {
        "fmr": cfg.fmr,
        "pair_threshold": float(np.quantile(different, q)),
        "search_threshold": float(np.quantile(search_null, q)),
        "candidates": cfg.candidates,
        "n_different_pairs": int(len(different)),
        "n_search_images": int(len(search_null)),
        "rule": (f"threshold = the {q:.0%} quantile of re-ID scores of held-out real images of patients the network never "
                 f"saw, each against its {cfg.candidates} nearest training-patient images (different patients by "
                 f"construction): at most {cfg.fmr:.0%} of such images score above it (false-match rate)"),
        "small_sample": bool(len(search_null) * cfg.fmr < 1),
    }
    save_reid(out_dir / "reid.pt", net, cfg.model, calibration)
    summary = {
        "verification_auc": test_auc,
        "calibration": calibration,
        "best_step": best[1] or cfg.steps,
        "val_auc": best[0] if best[0] >= 0 else None,
        "patients": {s: sorted({patients[i] for i in index[s]}) for s in ("train", "val", "test")},
        "images": {s: len(index[s]) for s in ("train", "val", "test")},
        "config": cfg.model_dump(mode="json"),
        "device": device,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if calibration["small_sample"]:
        log.warning("only %d held-out images for a %.0f%% false-match threshold: it is their maximum, not a quantile",
                    len(search_null), 100 * cfg.fmr)
    atomic_write_json(out_dir / "reid.json", summary)
    log.info("verification AUC on %d held-out patients: %.4f; saved %s", test_auc["n_patients"], test_auc["value"],
             out_dir / "reid.pt")
    if not math.isfinite(test_auc["value"]):
        raise ModelError("verification AUC is not finite", fix="check the data (data inspect) and lower model.lr")
    return summary
