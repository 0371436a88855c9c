"""Latent and text-embedding caches (RAM or disk), keyed by everything that produced them.

The key hashes the image bytes, the preprocessing (resolution, resize, flips), the VAE weights and
dtype (latents), or the prompts, tokenizer and text-encoder weights (embeddings). Change any of
them and the key changes, so a stale cache is never used; the old file is left for other runs.

Latents are cached as the VAE's distribution parameters (mean and log-variance), not as one
sample: each step still draws a fresh latent sample from its own seeded generator, so a cached run
computes the same loss as an uncached one.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from synthcxr.fileio import atomic_write_bytes, hash_strings, sha256_bytes, sha256_file
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)

CACHE_VERSION = "2"  # 2: text entries are the family's named conditioning tensors


def module_fingerprint(module: Any) -> str:
    """Hash of a module's weights (and their dtype): identical weights <=> identical hash."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return sha256_bytes(json.dumps([vocab, tokenizer.model_max_length]).encode())


def source_fingerprint(source: Any) -> str:
    """Content hash of one image (a path, or a record with a path or decoded pixels)."""
    path = getattr(source, "image_path", source)
    pixels = getattr(source, "pixels", None)
    if pixels is not None:
        return sha256_bytes(pixels.tobytes()) + str(pixels.shape)
    return sha256_file(path)


def sample_latents(params: Any, eps: Any, shift: float, scaling_factor: float) -> Any:
    """A latent sample from the VAE's diagonal Gaussian (diffusers' formula), shifted and scaled for the denoiser."""
    import torch

    mean, logvar = torch.chunk(params, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    sample = mean + std * eps
    return (sample - shift) * scaling_factor if shift else sample * scaling_factor


class LatentCache:
    """Latent-distribution parameters of every image (and its mirror image when flips are on)."""

    def __init__(self, params: Any):
        self.params = params  # [N, F, 8, h, w] with F = 2 when flips are cached, else 1

    def get(self, indices: Sequence[int], flips: Sequence[bool] | None = None) -> Any:
        import torch

        # python-int indexing gives views; one stack kernel, no index tensor copied to the GPU (a sync)
        views = flips if flips is not None else [False] * len(indices)
        return torch.stack([self.params[i, int(f)] for i, f in zip(indices, views, strict=True)])


def _load_or_build(kind: str, path: Path | None, key: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    import torch

    if kind == "disk" and path is not None and path.exists():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("key") == key:
            log.info("using cache %s", path)
            return data
        log.warning("cache %s has a different key; rebuilding it", path)
    data = build()
    data["key"] = key
    if kind == "disk" and path is not None:
        buf = io.BytesIO()
        torch.save(data, buf)
        atomic_write_bytes(path, buf.getvalue())
        log.info("cache written to %s", path)
    return data


def build_latent_cache(kind: str, cache_dir: Path | None, sources: list[Any], load_pixels: Callable[[Any], Any],
                       encode: Callable[[Any], Any], *, resolution: int, resize: str, flips: bool,
                       vae_fingerprint: str, batch_size: int, device: Any, what: str = "images") -> LatentCache:
    """Encode every image once (RAM) or once per key (disk). `encode(pixels) -> latent params`."""
    import torch

    key = hash_strings(["latents", CACHE_VERSION, str(resolution), resize, str(flips), vae_fingerprint,
                        *(source_fingerprint(s) for s in sources)])
    path = cache_dir / f"latents-{key[:24]}.pt" if cache_dir is not None else None

    def build() -> dict[str, Any]:
        chunks = []
        with progress_bar(len(sources), f"caching latents ({what})") as (progress, task):
            for start in range(0, len(sources), batch_size):
                pixels = torch.stack([load_pixels(s) for s in sources[start:start + batch_size]])
                views = [pixels, torch.flip(pixels, dims=[3])] if flips else [pixels]
                with torch.no_grad():
                    chunk = torch.stack([encode(v).float().cpu() for v in views], dim=1)
                chunks.append(chunk)
                progress.advance(task, len(pixels))
        return {"params": torch.cat(chunks)}

    data = _load_or_build(kind, path, key, build)
    return LatentCache(data["params"].to(device))


class TextCache:
    """The family's conditioning tensors per prompt (only when no text encoder trains)."""

    def __init__(self, embeddings: dict[str, dict[str, Any]]):
        self.embeddings = embeddings

    def get(self, prompts: Sequence[str]) -> dict[str, Any]:
        import torch

        first = self.embeddings[prompts[0]]
        return {key: torch.stack([self.embeddings[p][key] for p in prompts]) for key in first}


def build_text_cache(kind: str, cache_dir: Path | None, prompts: list[str],
                     encode: Callable[[list[str]], dict[str, Any]], *, text_fingerprint: str, device: Any) -> TextCache:
    """Encode every distinct prompt once; `encode(prompts) -> {name: tensor with one row per prompt}`."""
    unique = sorted(set(prompts))
    key = hash_strings(["text", CACHE_VERSION, text_fingerprint, *unique])
    path = cache_dir / f"text-{key[:24]}.pt" if cache_dir is not None else None

    def build() -> dict[str, Any]:
        import torch

        out = {}
        with torch.no_grad():
            for start in range(0, len(unique), 16):
                batch = unique[start:start + 16]
                encoded = {name: value.cpu() for name, value in encode(batch).items()}
                for row, prompt in enumerate(batch):
                    out[prompt] = {name: value[row].clone() for name, value in encoded.items()}
        return {"embeddings": out}

    data = _load_or_build(kind, path, key, build)
    return TextCache({p: {k: v.to(device) for k, v in e.items()} for p, e in data["embeddings"].items()})
