"""Per-family benchmarks behind `train_step.py --family F` and `generate.py --family F`.

A tiny random model of the family (real diffusers classes, tiny sizes) is timed two ways in one run:
a reference written the way diffusers' training examples (train_dreambooth_lora_sdxl.py, _sd3.py,
_flux.py, _sana.py; PixArt as its pipeline calls the transformer) and a plain pipeline call do it, and
synthcxr's own step / `generate_images` on the same weights. The two alternate so machine noise hits both; the result is the ratio of speeds (ours / reference, >= 1 means
synthcxr is not slower). CPU sizes only measure overhead; GPU numbers need the real architectures.
"""

from __future__ import annotations

import inspect
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


MAIN_METHOD = {"sdxl": "lora", "sd3": "lora", "flux": "lora", "pixart": "full", "sana": "full"}
"""The method each family is benchmarked with: the public benchmark's recipe (LoRA for the large UNet / MMDiT
families, full fine-tuning for the 0.6B DiTs)."""


def _check_family(family: str) -> str:
    if family not in MAIN_METHOD:
        raise SystemExit(f"--family {family}: the reference step covers {', '.join(MAIN_METHOD)} "
                         "(SD 1.x: run without --family)")
    return MAIN_METHOD[family]


def _reference_encode(family: str, pipe: Any, prompts: list[str]) -> dict[str, Any]:
    """Prompt conditioning through the pipeline's own `encode_prompt`, every step, as the examples do when
    the text encoders stay loaded."""
    if family == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=77)
        return {"pe": pe, "pooled": pooled}
    if family == "sdxl":
        pe, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        return {"pe": pe, "pooled": pooled}
    if family == "flux":
        from synthcxr.models.families.flux import T5_MAX_LENGTH

        pe, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, device="cpu",
                                                  max_sequence_length=T5_MAX_LENGTH)
        return {"pe": pe, "pooled": pooled, "text_ids": text_ids}
    if family == "sana":
        from synthcxr.models.families.sana import MAX_LENGTH, complex_human_instruction

        pe, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                            clean_caption=False, max_sequence_length=MAX_LENGTH,
                                            complex_human_instruction=complex_human_instruction())
        return {"pe": pe, "mask": mask}
    from synthcxr.models.families.pixart import T5_MAX_LENGTH

    pe, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu", clean_caption=False,
                                        max_sequence_length=T5_MAX_LENGTH)
    return {"pe": pe, "mask": mask}


def _reference_predict(family: str, pipe: Any, den: Any, noisy: Any, t: Any, c: dict[str, Any], res: int) -> Any:
    """The denoiser call of each family's diffusers training example (train_dreambooth_lora_sdxl.py, _sd3.py,
    _flux.py, _sana.py; PixArt as its pipeline calls it), learned-sigma halves dropped."""
    import torch
    from diffusers import FluxPipeline

    bs = len(noisy)
    if family == "sdxl":
        time_ids = torch.tensor([[res, res, 0, 0, res, res]] * bs, dtype=c["pe"].dtype)
        return den(noisy, t, c["pe"], added_cond_kwargs={"text_embeds": c["pooled"], "time_ids": time_ids},
                   return_dict=False)[0]
    if family == "sd3":
        return den(hidden_states=noisy, timestep=t, encoder_hidden_states=c["pe"], pooled_projections=c["pooled"],
                   return_dict=False)[0]
    if family == "flux":
        _, ch, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, bs, ch, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(bs, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = torch.full((bs,), 3.5) if den.config.guidance_embeds else None
        pred = den(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=c["pooled"],
                   encoder_hidden_states=c["pe"], txt_ids=c["text_ids"], img_ids=image_ids, return_dict=False)[0]
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return FluxPipeline._unpack_latents(pred, h * factor, w * factor, factor)
    if family == "sana":
        pred = den(hidden_states=noisy, encoder_hidden_states=c["pe"], encoder_attention_mask=c["mask"], timestep=t,
                   return_dict=False)[0]
    else:  # pixart
        pred = den(noisy, encoder_hidden_states=c["pe"], encoder_attention_mask=c["mask"], timestep=t,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return pred.chunk(2, dim=1)[0] if pred.shape[1] == 2 * noisy.shape[1] else pred


def reference_train_step(family: str, model: Path, res: int, bs: int, rank: int = 4):
    """One step of the family's main method as the diffusers examples write it: VAE and text encoders each
    step (no cache), the family's noise (DDPM; logit-normal flow matching for SD3, Sana and Flux), LoRA r4
    or every transformer weight, AdamW, grad clipping."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig

    from synthcxr.models.families import get_family

    method = _check_family(family)
    fam = get_family(family)
    pipe = fam.pipeline_cls().from_pretrained(str(model))
    den = getattr(pipe, fam.denoiser)
    for module in (pipe.vae, den, *(getattr(pipe, s.encoder) for s in fam.text_encoders)):
        module.requires_grad_(False)
    if method == "lora":
        den.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                   target_modules=list(fam.lora_targets)))
    else:
        den.requires_grad_(True)
    den.train()
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
            encoded = pipe.vae.encode(pixel)
            raw = encoded.latent if family == "sana" else encoded.latent_dist.sample()  # DC-AE: no distribution
            latents = (raw - shift) * scale
            cond = _reference_encode(family, pipe, [PROMPT] * bs)
        noise = torch.randn_like(latents)
        if fam.objective == "flow":
            u = compute_density_for_timestep_sampling("logit_normal", bs, logit_mean=0.0, logit_std=1.0)
            idx = (u * sched.config.num_train_timesteps).long()
            t = sched.timesteps[idx]
            sigma = sched.sigmas[idx].view(-1, 1, 1, 1)
            noisy = (1 - sigma) * latents + sigma * noise
            target = noise - latents
        else:
            t = torch.randint(0, sched.config.num_train_timesteps, (bs,)).long()
            noisy = sched.add_noise(latents, noise, t)
            target = noise
        pred = _reference_predict(family, pipe, den, noisy, t, cond, res)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def ours_train_step(family: str, model: Path, data: Path, res: int, bs: int, run_dir: Path, total: int):
    """synthcxr's step from a training config: the family's main method (LoRA rank 4 or full), AdamW,
    latent and text cache in RAM."""
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.loop import setup

    method = _check_family(family)
    cfg = build_config(TrainConfig, {
        "model": {"path": str(model)},
        "data": {"path": str(data), "resolution": res, "split": {"val": 0.0, "test": 0.0}},
        "method": {"name": "lora", "rank": 4, "alpha": 4} if method == "lora" else {"name": method},
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-2},
        "train": {"max_steps": total, "batch_size": bs, "mixed_precision": "no", "cache_latents": "ram",
                  "checkpoint_every": 10**9, "log_every": 10**9, "validation_seeds": [], "max_grad_norm": 1.0},
    })
    session = setup(cfg, run_dir)
    batches = session.batches()
    return lambda: session.train_step(batches)


def _alternate(sides: dict[str, Any], warmup: int, repeats: int, per_repeat: int) -> dict[str, dict[str, float]]:
    """Seconds per call of each side: {"median": ..., "min": ...} by side. The sides alternate call by call and
    swap order every round, so load from other jobs on the machine falls on both alike; the minimum is the
    least disturbed call (the better estimate on a busy machine), the median the typical one."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides)
    for _ in range(repeats * per_repeat):
        for name in order:
            began = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - began)
        order.reverse()
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "min": {k: min(v) for k, v in times.items()}}


def _ratios(secs: dict[str, dict[str, float]], per_call: int) -> dict[str, float]:
    """img/s of both sides (medians) and the speed ratio ours / reference by median and by minimum."""
    med, low = secs["median"], secs["min"]
    return {"reference_img_s": per_call / med["reference"], "ours_img_s": per_call / med["ours"],
            "ratio_ours_vs_reference": med["reference"] / med["ours"],
            "ratio_ours_vs_reference_min": low["reference"] / low["ours"]}


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
    result = {"family": family, "method": MAIN_METHOD[family], "device": "cpu", "resolution": res, "batch": bs,
              "threads": torch.get_num_threads(), "steps_timed": repeats * steps, **_ratios(secs, bs)}
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
        # PixArt and Sana snap height/width to their aspect-ratio bins unless told not to (generate does)
        plain_options = ({"use_resolution_binning": False}
                         if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters else {})
        counter = iter(range(10**6))

        def plain():
            folder = work / f"plain{next(counter)}"
            folder.mkdir()
            for start in range(0, n, batch):
                gens = [torch.Generator().manual_seed(s) for s in range(start, min(start + batch, n))]
                images = pipe([PROMPT] * len(gens), num_inference_steps=steps, guidance_scale=guidance,
                              height=res, width=res, generator=gens, **plain_options).images
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
              "threads": torch.get_num_threads(), "repeats": repeats, **_ratios(secs, n)}
    _report(result, out)
    return result


def _report(result: dict, out: str | None) -> None:
    print(f"{result['family']}: reference {result['reference_img_s']:.2f} img/s, ours {result['ours_img_s']:.2f} img/s, "
          f"ratio ours/reference {result['ratio_ours_vs_reference']:.2f} (by the fastest call "
          f"{result['ratio_ours_vs_reference_min']:.2f})")
    print(json.dumps(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
