"""Validation: sample images at fixed prompts/seeds, and a held-out loss at fixed timesteps and noise.

The held-out loss uses the VAE means (no sampling) and noise that depends only on the image's
position in the held-out list, so runs with different optimizers, seeds or devices are scored on
exactly the same inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthcxr.fileio import append_jsonl, atomic_write_json
from synthcxr.logging_utils import get_logger

if TYPE_CHECKING:
    from synthcxr.train.loop import Session

log = get_logger(__name__)


def validation_loss(session: Session) -> float | None:
    """Held-out loss at fixed timesteps with fixed noise: comparable across optimizers and runs.

    Latents are the VAE means (no sampling) and noise image i comes from a CPU generator seeded
    with i, so the same held-out images give the same inputs on every run and device.
    """
    import torch

    from synthcxr.train.loop import load_pixels

    if not session.val_sources:
        return None
    unet = session.accelerator.unwrap_model(session.unet)
    if "latents" not in session.memo:
        with torch.no_grad():
            lat = [torch.chunk(session.encode_pixels(load_pixels(session.cfg, s)[None]), 2, dim=1)[0] for s in session.val_sources]
        shift, scale = session.models.family.latent_scale(session.models.vae)
        session.memo["latents"] = (torch.cat(lat) - shift) * scale
    if "hidden" not in session.memo or session.cfg.method.train_text_encoder:
        with torch.no_grad():
            session.memo["hidden"] = session.encode_prompts(session.val_prompts)
    latents, cond = session.memo["latents"], session.memo["hidden"]
    family, objective = session.models.family, session.objective
    draws = objective.fixed(session.cfg.train.validation_timesteps, session.device)
    n = len(draws)
    losses = []
    with torch.no_grad(), session.accelerator.autocast():
        for i in range(len(latents)):
            g = torch.Generator().manual_seed(10_000 + i)
            noise = torch.randn((n, *latents.shape[1:]), generator=g).to(session.device)
            x0 = latents[i:i + 1].expand(n, -1, -1, -1)
            noised = objective.apply(x0, noise, draws)  # unweighted: a plain MSE comparable across runs
            row = {k: v[i:i + 1].expand(n, *v.shape[1:]) for k, v in cond.items()}
            pred = family.denoise(unet, noised.noisy, noised.timesteps, row, resolution=session.cfg.data.resolution)
            losses.append(torch.mean((pred.float() - noised.target.float()) ** 2).item())
    return float(sum(losses) / len(losses))


def sample_images(session: Session, step: int) -> Path:
    """Images at fixed prompts and seeds into samples/step_XXXXX/ (same seeds every time)."""
    import dataclasses

    import torch

    from synthcxr.train.methods import pipeline_for

    models = session.unwrapped_models()
    fresh = type(models.scheduler).from_config(models.scheduler.config)  # sampling must not touch the model's
    pipe = pipeline_for(dataclasses.replace(models, scheduler=fresh, noise_scheduler=None))
    pipe.set_progress_bar_config(disable=True)
    out = session.run.samples / f"step_{step:05d}"
    out.mkdir(parents=True, exist_ok=True)
    t = session.cfg.train
    for p_i, prompt in enumerate(validation_prompts(session)):
        for seed in t.validation_seeds:
            with torch.no_grad(), session.accelerator.autocast():
                image = pipe(prompt, num_inference_steps=t.validation_steps, guidance_scale=t.validation_guidance,
                             generator=torch.Generator().manual_seed(seed), height=session.cfg.data.resolution,
                             width=session.cfg.data.resolution).images[0]
            image.save(out / f"p{p_i:02d}_seed{seed}.png")
    atomic_write_json(out / "prompts.json", {"prompts": validation_prompts(session), "seeds": t.validation_seeds})
    return out


def validation_prompts(session: Session) -> list[str]:
    if session.cfg.train.validation_prompts:
        return session.cfg.train.validation_prompts
    return list(dict.fromkeys(session.prompts))[:2]


def validate(session: Session, step: int) -> dict[str, Any]:
    """Samples + held-out loss on the main process, at the weights that get exported: EMA weights when
    EMA is on, a schedule-free optimizer's averaged weights; the training weights are put back exactly."""
    from synthcxr.train.optimizers import evaluation_weights

    row: dict[str, Any] = {"step": step, "kind": "val"}
    if session.is_main:
        params = list(session.trainable.values())
        modules = [session.models.unet, *session.models.text_encoders.values()]
        was_training = [m.training for m in modules]
        with evaluation_weights(session.optimizer, params):
            for m in modules:
                m.eval()
            if session.ema is not None:
                session.ema.store(params)
                session.ema.copy_to(params)
            try:
                with session.text_encoders_on_device():
                    row["val_loss"] = validation_loss(session)
                    if session.cfg.train.validation_seeds:
                        row["samples"] = str(sample_images(session, step).relative_to(session.run.root))
            finally:
                if session.ema is not None:
                    session.ema.restore(params)
                for m, flag in zip(modules, was_training, strict=True):
                    m.train(flag)
        append_jsonl(session.run.metrics, row)
        if session.tb is not None and row["val_loss"] is not None:
            session.tb.add_scalar("val/loss", row["val_loss"], step)
        log.info("step %d: validation loss %s, samples in %s", step,
                 f"{row['val_loss']:.5f}" if row["val_loss"] is not None else "n/a (no held-out images)",
                 row.get("samples", "none (no validation seeds)"))
    session.accelerator.wait_for_everyone()
    return row

