"""Fit a tiny model's random VAE to chest X-rays, so that its decoder can render them.

A random `AutoencoderKL` decodes every latent to texture noise, so whatever a denoiser learns on
top of it never shows in the images. A few hundred Adam steps of reconstruction make it a usable
autoencoder in well under a minute on a CPU: the loss is L1 on random crops of half the image side
(convolutions see the same statistics in a crop as in the whole image, at a quarter of the cost),
plus a tiny KL term so the posterior stays narrow and sampled latents decode sharply. Afterwards
the latent scaling is set as Stable Diffusion's was: `scaling_factor = 1 / std` of the encoded data
(and `shift_factor` = mean for VAEs that have one), so the denoiser trains on unit-variance latents.
Everything is seeded; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)


@dataclass(frozen=True)
class VaeFit:
    """How the tiny VAE is fitted (defaults: about 20 s on 2 CPU cores at 64 px)."""

    steps: int = 300
    batch_size: int = 4
    lr: float = 4e-3
    """Peak learning rate of a one-cycle schedule (warm-up, then cosine decay to ~0)."""
    kl_weight: float = 1e-6
    """Weight of the KL term (per latent element) against the per-pixel L1 loss."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.kl_weight < 0:
            raise ValueError(f"invalid VAE fit settings: {self}")


def load_pixels(data: str | Path, resolution: int) -> Any:
    """Every image of the data folder(s) as the model sees it: N x 3 x res x res floats in [-1, 1]."""
    import torch

    from synthcxr.data.config import DataConfig
    from synthcxr.data.dataset import load_records
    from synthcxr.data.preprocess import load_image, to_model_tensor
    from synthcxr.errors import DataError

    if not Path(data).exists():
        raise DataError("data for fitting the tiny VAE not found", file=data,
                        fix="pass a folder of chest X-rays (e.g. one holding ChinaSet_AllFiles), "
                            "or make one with `synthcxr data make-fixture`")
    records = load_records(DataConfig(path=Path(data), resolution=resolution))
    return torch.stack([to_model_tensor(load_image(r, resolution)) for r in records])


def _latent_stats(vae: Any, pixels: Any, generator: Any) -> tuple[float, float]:
    """Mean and std of sampled latents over the data (as the training loop will draw them)."""
    import torch

    with torch.no_grad():
        z = torch.cat([vae.encode(chunk).latent_dist.sample(generator=generator) for chunk in pixels.split(16)])
    return float(z.mean()), float(z.std())


def _reconstruction_l1(vae: Any, pixels: Any) -> float:
    import torch

    with torch.no_grad():
        errors = [(vae.decode(vae.encode(c).latent_dist.mode()).sample - c).abs().mean() * len(c)
                  for c in pixels.split(16)]
    return float(sum(errors) / len(pixels))


def fit_vae(vae: Any, pixels: Any, fit: VaeFit = VaeFit()) -> dict[str, Any]:
    """Train `vae` in place on `pixels` (N x 3 x H x W in [-1, 1]) and set its latent scaling.

    Returns what was done (settings, reconstruction L1 before and after on the whole images, and the
    latent statistics) for the model's `synthcxr_tiny.json`.
    """
    import torch

    side = pixels.shape[-1]
    crop = max(16, side // 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fit.seed)
        g = torch.Generator().manual_seed(fit.seed)
        vae.eval()
        before = _reconstruction_l1(vae, pixels)
        vae.train()
        vae.requires_grad_(True)
        opt = torch.optim.Adam(vae.parameters(), lr=fit.lr)
        if fit.steps >= 10:  # warm up over >= 2 steps: OneCycleLR divides by the warm-up length
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=fit.lr, total_steps=fit.steps,
                                                        pct_start=max(0.1, 2.0 / fit.steps))
        else:  # too short to schedule: a constant rate
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        loss_value = float("nan")
        with progress_bar(fit.steps, "fit tiny VAE") as (progress, task):
            for step in range(fit.steps):
                # 1. a batch of random crops (same place in every image of the batch)
                idx = torch.randint(0, len(pixels), (fit.batch_size,), generator=g)
                top, left = torch.randint(0, side - crop + 1, (2,), generator=g).tolist()
                batch = pixels[idx, :, top:top + crop, left:left + crop]
                # 2. encode, sample, decode; L1 + a small KL keeps the posterior narrow
                posterior = vae.encode(batch).latent_dist
                recon = vae.decode(posterior.sample(generator=g)).sample
                l1 = (recon - batch).abs().mean()
                kl = posterior.kl().mean() / posterior.mean[0].numel()
                loss = l1 + fit.kl_weight * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_value = l1.item()
                progress.update(task, advance=1, **({"description": f"fit tiny VAE (L1 {loss_value:.3f})"}
                                                    if step % 10 == 0 else {}))
        vae.eval()
        vae.requires_grad_(False)
        after = _reconstruction_l1(vae, pixels)
        mean, std = _latent_stats(vae, pixels, g)
    if not torch.isfinite(torch.tensor([after, mean, std])).all() or std <= 0:
        from synthcxr.errors import ModelError

        raise ModelError("fitting the tiny VAE diverged (non-finite loss or latents)",
                         fix="use fewer steps or a lower learning rate, or check the images")
    shifted = getattr(vae.config, "shift_factor", None) is not None
    if shifted:
        vae.register_to_config(shift_factor=mean)
        vae.register_to_config(scaling_factor=1.0 / std)
    else:  # SD 1.x/2.x convention: no shift; the std is taken around zero
        mean_sq = std ** 2 + mean ** 2
        vae.register_to_config(scaling_factor=1.0 / mean_sq ** 0.5)
    log.info("tiny VAE fitted on %d image(s): reconstruction L1 %.3f -> %.3f, scaling_factor %.4f",
             len(pixels), before, after, vae.config.scaling_factor)
    return {**asdict(fit), "images": len(pixels), "crop": crop, "l1_before": round(before, 5),
            "l1_after": round(after, 5), "last_batch_l1": round(loss_value, 5),
            "latent_mean": round(mean, 5), "latent_std": round(std, 5),
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(vae.config.shift_factor) if shifted else None}


def fit_saved_vae(model_dir: str | Path, data: str | Path, fit: VaeFit = VaeFit(), *, pixels: Any = None) -> dict[str, Any]:
    """Fit the VAE of a tiny model folder (just written by `make-tiny`) to `data`, in place.

    `pixels`: the data already loaded by `load_pixels` (callers check the data before writing the
    model). The folder's `synthcxr_tiny.json` records what the VAE was fitted on and how.
    """
    import json

    from diffusers import AutoencoderKL

    from synthcxr.errors import ModelError
    from synthcxr.models.load import library_progress_bars_off

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "vae" / "config.json").read_text()) if (model_dir / "vae" / "config.json").is_file() else {}
    if config.get("_class_name") != "AutoencoderKL":
        raise ModelError(f"fitting a VAE to data needs an AutoencoderKL, not {config.get('_class_name') or 'no VAE'}",
                         file=model_dir / "vae", fix="leave --train-vae out for this model family")
    info_file = model_dir / "synthcxr_tiny.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    resolution = int(info.get("sample_size") or config.get("sample_size") or 64)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    if pixels is None or pixels.shape[-1] != resolution:
        pixels = load_pixels(data, resolution)
    record = {"data": str(Path(data).resolve()), **fit_vae(vae, pixels, fit)}
    with library_progress_bars_off():
        vae.save_pretrained(model_dir / "vae", safe_serialization=True)
    info["vae"] = record
    info["note"] = "random denoiser and text encoder; VAE fitted to the data named under 'vae'; for tests and demos only"
    info_file.write_text(json.dumps(info, indent=1))
    return record
