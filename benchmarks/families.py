"""Per-family benchmarks behind `train_step.py --family F` and `generate.py --family F`.

A tiny random model of the family (real diffusers classes, tiny sizes) is timed two ways in one run:
a reference written the way diffusers' training examples (train_dreambooth_lora_sdxl.py, _sd3.py) and
a plain pipeline call do it, and synthcxr's own step / `generate_images` on the same weights. The two
alternate so machine noise hits both; the result is the ratio of speeds (ours / reference, >= 1 means
synthcxr is not slower). CPU sizes only measure overhead; GPU numbers need the real architectures.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "a chest x-ray of a 45 year old male, tuberculosis"


def _prepare(family: str, work: Path, res: int) -> tuple[Path, Path]:
    from synthcxr.data.fixtures import make_fixture_dataset
    from synthcxr.models.families import get_family

    model, data = work / f"tiny_{family}", work / "data"
    if not (model / "model_index.json").exists():
        get_family(family).write_tiny(model, resolution=res, seed=0)
    if not data.exists():
        make_fixture_dataset(data, "shenzhen", n=8, size=res, seed=0)
    return model, data


def reference_train_step(family: str, model: Path, res: int, bs: int, rank: int = 4):
    """One LoRA step as the diffusers examples write it: VAE and text encoders each step (no cache),
    the family's noise (DDPM for SDXL, logit-normal flow matching for SD3), AdamW, grad clipping."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig

    from synthcxr.models.families import get_family

    if family not in ("sdxl", "sd3"):
        raise SystemExit(f"--family {family}: this reference step covers sdxl and sd3 (SD 1.x: run without --family)")
    fam = get_family(family)
    pipe = fam.pipeline_cls().from_pretrained(str(model))
    den = getattr(pipe, fam.denoiser)
    for module in (pipe.vae, den, *(getattr(pipe, s.encoder) for s in fam.text_encoders)):
        module.requires_grad_(False)
    den.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(fam.lora_targets)))
    params = [p for p in den.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    pixel = torch.rand(bs, 3, res, res, generator=g) * 2 - 1
    sched = pipe.scheduler
    if fam.objective == "ddpm":
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(pipe.scheduler.config)
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    scale = pipe.vae.config.scaling_factor

    def step():
        with torch.no_grad():
            latents = (pipe.vae.encode(pixel).latent_dist.sample() - shift) * scale
            if family == "sd3":
                pe, _, pooled, _ = pipe.encode_prompt([PROMPT] * bs, None, None, device="cpu",
                                                      do_classifier_free_guidance=False, max_sequence_length=77)
            else:
                pe, _, pooled, _ = pipe.encode_prompt([PROMPT] * bs, device="cpu", do_classifier_free_guidance=False)
        noise = torch.randn_like(latents)
        if fam.objective == "flow":
            u = compute_density_for_timestep_sampling("logit_normal", bs, logit_mean=0.0, logit_std=1.0)
            idx = (u * sched.config.num_train_timesteps).long()
            t = sched.timesteps[idx]
            sigma = sched.sigmas[idx].view(-1, 1, 1, 1)
            noisy = (1 - sigma) * latents + sigma * noise
            pred = den(hidden_states=noisy, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled,
                       return_dict=False)[0]
            target = noise - latents
        else:
            t = torch.randint(0, sched.config.num_train_timesteps, (bs,)).long()
            noisy = sched.add_noise(latents, noise, t)
            time_ids = torch.tensor([[res, res, 0, 0, res, res]] * bs, dtype=pe.dtype)
            pred = den(noisy, t, pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                       return_dict=False)[0]
            target = noise
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def ours_train_step(family: str, model: Path, data: Path, res: int, bs: int, run_dir: Path, total: int):
    """synthcxr's step from a training config: LoRA rank 4, AdamW, latent and text cache in RAM."""
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.loop import setup

    cfg = build_config(TrainConfig, {
        "model": {"path": str(model)},
        "data": {"path": str(data), "resolution": res, "split": {"val": 0.0, "test": 0.0}},
        "method": {"name": "lora", "rank": 4, "alpha": 4},
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-2},
        "train": {"max_steps": total, "batch_size": bs, "mixed_precision": "no", "cache_latents": "ram",
                  "checkpoint_every": 10**9, "log_every": 10**9, "validation_seeds": [], "max_grad_norm": 1.0},
    })
    session = setup(cfg, run_dir)
    batches = session.batches()
    return lambda: session.train_step(batches)


def _alternate(sides: dict[str, Any], warmup: int, repeats: int, per_repeat: int) -> dict[str, float]:
    """Median seconds per call of each side, sides alternating within every repeat."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            began = time.perf_counter()
            for _ in range(per_repeat):
                fn()
            times[name].append((time.perf_counter() - began) / per_repeat)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_benchmark(family: str, *, res: int = 64, bs: int = 2, warmup: int = 2, repeats: int = 3,
                         steps: int = 4, out: str | None = None) -> dict:
    import torch

    logging.getLogger("synthcxr").setLevel(logging.WARNING)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix=f"synthcxr-bench-{family}-"))
    try:
        model, data = _prepare(family, work, res)
        total = warmup + repeats * steps + 1
        sides = {"reference": reference_train_step(family, model, res, bs),
                 "ours": ours_train_step(family, model, data, res, bs, work / "run", total)}
        secs = _alternate(sides, warmup, repeats, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"family": family, "device": "cpu", "resolution": res, "batch": bs, "threads": torch.get_num_threads(),
              "reference_img_s": bs / secs["reference"], "ours_img_s": bs / secs["ours"],
              "ratio_ours_vs_reference": secs["reference"] / secs["ours"]}
    _report(result, out)
    return result


def generate_benchmark(family: str, *, res: int = 64, n: int = 4, batch: int = 2, steps: int = 4,
                       repeats: int = 3, out: str | None = None) -> dict:
    """Images/s of `generate_images` against a plain pipeline call (same weights, steps, guidance, batch),
    both writing one PNG per image."""
    import torch

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.models.families import get_family

    logging.getLogger("synthcxr").setLevel(logging.WARNING)
    fam = get_family(family)
    work = Path(tempfile.mkdtemp(prefix=f"synthcxr-bench-gen-{family}-"))
    try:
        model, _ = _prepare(family, work, res)
        pipe = fam.pipeline_cls().from_pretrained(str(model))
        pipe.set_progress_bar_config(disable=True)
        guidance = fam.sample.guidance
        counter = iter(range(10**6))

        def plain():
            folder = work / f"plain{next(counter)}"
            folder.mkdir()
            for start in range(0, n, batch):
                gens = [torch.Generator().manual_seed(s) for s in range(start, min(start + batch, n))]
                images = pipe([PROMPT] * len(gens), num_inference_steps=steps, guidance_scale=guidance,
                              height=res, width=res, generator=gens).images
                for i, image in enumerate(images):
                    image.save(folder / f"{start + i:05d}.png")

        def ours():
            generate_images(GenerateConfig(model=str(model), prompt=PROMPT, n=n, batch_size=batch, steps=steps,
                                           guidance=guidance, resolution=res,
                                           out=work / f"ours{next(counter)}"), pipe=pipe)

        secs = _alternate({"reference": plain, "ours": ours}, warmup=1, repeats=repeats, per_repeat=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"family": family, "device": "cpu", "resolution": res, "n": n, "batch": batch, "steps": steps,
              "threads": torch.get_num_threads(), "reference_img_s": n / secs["reference"],
              "ours_img_s": n / secs["ours"], "ratio_ours_vs_reference": secs["reference"] / secs["ours"]}
    _report(result, out)
    return result


def _report(result: dict, out: str | None) -> None:
    print(f"{result['family']}: reference {result['reference_img_s']:.2f} img/s, ours {result['ours_img_s']:.2f} img/s, "
          f"ratio ours/reference {result['ratio_ours_vs_reference']:.2f}")
    print(json.dumps(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
