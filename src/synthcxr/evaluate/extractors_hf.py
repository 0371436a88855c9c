"""Feature extractors from transformers checkpoints: DINOv2, RAD-DINO and CLIP.

Why these: FD on DINOv2 ViT-L/14 features tracks human judgement of realism better than Inception
FID (Stein et al. 2023, dgm-eval); RAD-DINO (a DINOv2 trained on chest X-rays) is the chest X-ray
benchmark's feature space; CMMD uses CLIP ViT-L/14 at 336 px (Jayasumana et al. 2024).

Weights (the same offline rule as every extractor): `extractor.weights` = a local folder made by
`save_pretrained` / `huggingface-cli download ID --local-dir DIR`; otherwise the Hugging Face hub
cache (`local_files_only`: nothing is downloaded at run time); otherwise a clear error. Random
initialisation only with `pretrained: false`, flagged by `weights_warning` like any untrained net.

Input conventions (every extractor gets RGB 0..255 from the one antialiased resize):
- dinov2: 224 px, ImageNet mean/std, the final-layernorm CLS token (dgm-eval's `DINOv2Encoder`).
- raddino: 518 px, the checkpoint's `preprocessor_config.json` mean/std (RAD-DINO's own), CLS token.
- clip: 336 px for ViT-L/14-336 (the model's size otherwise), CLIP mean/std, the projected image
  embedding L2-normalised, as google-research/cmmd's `ClipEmbeddingModel`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from synthcxr.errors import ConfigError, ModelError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RADDINO_MEAN = (0.5307, 0.5307, 0.5307)
RADDINO_STD = (0.2583, 0.2583, 0.2583)

# variant -> (hub id, architecture for random init)
DINOV2 = {
    "vits14": ("facebook/dinov2-small", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6}),
    "vitb14": ("facebook/dinov2-base", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}),
    "vitl14": ("facebook/dinov2-large", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}),
    "vitg14": ("facebook/dinov2-giant", {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24,
                                         "use_swiglu_ffn": True, "mlp_ratio": 4}),
}
RADDINO = {"vitb14": ("microsoft/rad-dino", DINOV2["vitb14"][1])}
CLIP = {
    "vitl14-336": ("openai/clip-vit-large-patch14-336", {"hidden_size": 1024, "intermediate_size": 4096,
                                                         "num_hidden_layers": 24, "num_attention_heads": 16,
                                                         "patch_size": 14, "image_size": 336, "projection_dim": 768}),
    "vitb32": ("openai/clip-vit-base-patch32", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                                "num_attention_heads": 12, "patch_size": 32, "image_size": 224,
                                                "projection_dim": 512}),
    "vitb16": ("openai/clip-vit-base-patch16", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                                "num_attention_heads": 12, "patch_size": 16, "image_size": 224,
                                                "projection_dim": 512}),
}
FAMILIES = {"dinov2": (DINOV2, "vitl14"), "raddino": (RADDINO, "vitb14"), "clip": (CLIP, "vitl14-336")}


def _variant(name: str) -> tuple[str, str, dict[str, Any]]:
    family, _, variant = name.partition(":")
    table, default = FAMILIES[family]
    variant = variant or default
    if variant not in table:
        raise ConfigError(f"unknown {family} variant {variant!r}", fix=f"use {family} or {family}:" + f" / {family}:".join(table))
    hub_id, arch = table[variant]
    return variant, hub_id, arch


def folder_digest(folder: Path) -> str:
    """Identity of a checkpoint folder for the feature cache: its config plus the size and the first
    and last MiB of every weights file (hashing gigabytes on every run would cost more than it saves)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        h.update(path.relative_to(folder).as_posix().encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with path.open("rb") as fh:
            h.update(fh.read(2**20))
            if size > 2**21:
                fh.seek(-(2**20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def _fix(family: str, hub_id: str) -> str:
    return (f"on a networked machine run `huggingface-cli download {hub_id} --local-dir DIR` (or load it once so it "
            f"is in the hub cache), then pass --set extractor.weights=DIR; for smoke tests only, "
            f"--set extractor.pretrained=false builds a random-init {family}")


def _load(cls, family: str, hub_id: str, weights: Path | None):  # noqa: ANN001, ANN202
    """(model, source folder or None, identity) from a local folder or the hub cache; never downloads."""
    if weights is not None:
        folder = Path(weights)
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise ModelError(f"{family} weights must be a checkpoint folder with config.json", file=folder,
                             fix=_fix(family, hub_id))
        try:
            return cls.from_pretrained(str(folder)), folder, folder_digest(folder)
        except Exception as exc:
            raise ModelError(f"cannot load {family} from {folder}: {exc}", file=folder, fix=_fix(family, hub_id)) from exc
    try:
        model = cls.from_pretrained(hub_id, local_files_only=True)
    except Exception as exc:  # not in the cache (offline)
        raise ModelError(f"no {family} weights: {hub_id} is not in the Hugging Face cache and no local folder was given "
                         f"({type(exc).__name__})", fix=_fix(family, hub_id)) from None
    commit = getattr(model.config, "_commit_hash", None) or "cache"
    return model, None, f"{hub_id}@{commit}"


def _normalise(device: str, mean, std):  # noqa: ANN001, ANN202
    import torch

    m = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return lambda x: (x / 255.0 - m) / s


def build_dino(cfg, device: str, cache_dir: Path | None):  # noqa: ANN001, ANN201 - ExtractorConfig -> FeatureExtractor
    """`dinov2[:vits14|vitb14|vitl14|vitg14]` or `raddino`: the CLS token after the final layer norm."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from synthcxr.evaluate.features import FeatureExtractor

    family = cfg.name.split(":", 1)[0]
    variant, hub_id, arch = _variant(cfg.name)
    mean, std = (RADDINO_MEAN, RADDINO_STD) if family == "raddino" else (IMAGENET_MEAN, IMAGENET_STD)
    size = cfg.image_size or (518 if family == "raddino" else 224)
    if cfg.weights is None and not cfg.pretrained:
        torch.manual_seed(cfg.seed)
        model = Dinov2Model(Dinov2Config(**arch, patch_size=14, image_size=518))
        ident, pretrained = f"random{cfg.seed}", False
    else:
        model, folder, ident = _load(Dinov2Model, family, hub_id, cfg.weights)
        pretrained = True
        if family == "raddino" and folder is not None and (folder / "preprocessor_config.json").is_file():
            pre = json.loads((folder / "preprocessor_config.json").read_text())
            mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    if size % 14:
        raise ConfigError(f"{family} needs an image size that is a multiple of 14 (patch size), got {size}",
                          fix="set extractor.image_size to e.g. 224 (dinov2) or 518 (raddino)")
    model = model.eval().to(device)

    def module(x):  # noqa: ANN001, ANN202
        return model(pixel_values=x).pooler_output  # layernormed CLS token

    dim = int(model.config.hidden_size)
    return FeatureExtractor(cfg.name, f"{family}:{variant}:{ident}:{size}", module, size, dim, device,
                            _normalise(device, mean, std), pretrained)


def build_clip(cfg, device: str, cache_dir: Path | None):  # noqa: ANN001, ANN201
    """`clip[:vitl14-336|vitb32|vitb16]`: L2-normalised projected image embeddings (CMMD's feature space)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from synthcxr.evaluate.features import FeatureExtractor

    variant, hub_id, arch = _variant(cfg.name)
    if cfg.weights is None and not cfg.pretrained:
        torch.manual_seed(cfg.seed)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**arch))
        ident, pretrained = f"random{cfg.seed}", False
    else:
        model, _, ident = _load(CLIPVisionModelWithProjection, "clip", hub_id, cfg.weights)
        pretrained = True
    native = int(model.config.image_size)
    size = cfg.image_size or native
    model = model.eval().to(device)

    def module(x):  # noqa: ANN001, ANN202
        emb = model(pixel_values=x, interpolate_pos_encoding=size != native).image_embeds
        return emb / emb.norm(dim=-1, keepdim=True)

    dim = int(model.config.projection_dim)
    return FeatureExtractor(cfg.name, f"clip:{variant}:{ident}:{size}", module, size, dim, device,
                            _normalise(device, CLIP_MEAN, CLIP_STD), pretrained)
