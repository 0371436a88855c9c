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
from synthcxr.train.methods import Models

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
        session.memo["latents"] = torch.cat(lat) * session.models.vae.config.scaling_factor
    if "hidden" not in session.memo or session.cfg.method.train_text_encoder:
        with torch.no_grad():
            session.memo["hidden"] = session.encode_prompts(session.val_prompts)
    latents, hidden = session.memo["latents"], session.memo["hidden"]
    ts = torch.tensor(session.cfg.train.validation_timesteps, device=session.device)
    sched = session.models.noise_scheduler
    losses = []
    with torch.no_grad(), session.accelerator.autocast():
        for i in range(len(latents)):
            g = torch.Generator().manual_seed(10_000 + i)
            noise = torch.randn((len(ts), *latents.shape[1:]), generator=g).to(session.device)
            x0 = latents[i:i + 1].expand(len(ts), -1, -1, -1)
            noisy = sched.add_noise(x0, noise, ts)
            target = sched.get_velocity(x0, noise, ts) if sched.config.prediction_type == "v_prediction" else noise
            pred = unet(noisy, ts, hidden[i:i + 1].expand(len(ts), -1, -1), return_dict=False)[0]
            losses.append(torch.mean((pred.float() - target.float()) ** 2).item())
    return float(sum(losses) / len(losses))


def sample_images(session: Session, step: int) -> Path:
    """Images at fixed prompts and seeds into samples/step_XXXXX/ (same seeds every time)."""
    import torch

    from synthcxr.train.methods import pipeline_for

    unet = session.accelerator.unwrap_model(session.unet)
    text_encoder = session.accelerator.unwrap_model(session.text_encoder)
    pipe = pipeline_for(Models(unet=unet, vae=session.models.vae, text_encoder=text_encoder,
                                tokenizer=session.models.tokenizer,
                                scheduler=type(session.models.scheduler).from_config(session.models.scheduler.config),
                                noise_scheduler=None))
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
        modules = [session.models.unet, session.models.text_encoder]
        was_training = [m.training for m in modules]
        with evaluation_weights(session.optimizer, params):
            for m in modules:
                m.eval()
            if session.ema is not None:
                session.ema.store(params)
                session.ema.copy_to(params)
            try:
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

