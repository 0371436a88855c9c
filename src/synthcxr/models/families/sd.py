"""Stable Diffusion 1.x / 2.x: UNet, one CLIP text encoder, AutoencoderKL, epsilon or v-prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthcxr.models.families.base import Conditioning, Family, SampleDefaults, TextEncoderSlot, tokenize

DDPM_SAMPLERS = ("ddim", "dpmsolver++", "euler", "euler_a", "pndm", "unipc")


class StableDiffusion(Family):
    def encode_prompts(self, encoders: dict[str, Any], tokenizers: dict[str, Any], prompts: list[str],
                       device: Any) -> Conditioning:
        ids = tokenize(tokenizers["tokenizer"], prompts, device)
        return {"prompt_embeds": encoders["text_encoder"](ids, return_dict=False)[0]}

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning, *, resolution: int) -> Any:
        return denoiser(noisy, timesteps, cond["prompt_embeds"], return_dict=False)[0]

    def prompt_kwargs(self, pipe: Any, prompt: str, negative: str, device: Any, guidance: bool) -> dict[str, Any]:
        embeds, negative_embeds = pipe.encode_prompt(prompt, device, 1, guidance, negative or None)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds if guidance else None}

    def make_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Any:
        from synthcxr.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline(sample_size=resolution, seed=seed,
                                   prediction_type=options.get("prediction_type") or "epsilon")

    def write_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Path:
        from synthcxr.models.tiny import make_tiny_model  # the SD tiny model has its own writer

        return make_tiny_model(out_dir, sample_size=resolution, seed=seed,
                               prediction_type=options.get("prediction_type") or "epsilon")


SD = StableDiffusion(
    name="sd",
    label="Stable Diffusion 1.x/2.x",
    pipeline_class="StableDiffusionPipeline",
    detect_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    denoiser="unet",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", "clip"),),
    objective="ddpm",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    sample=SampleDefaults(steps=30, guidance=7.5, scheduler="dpmsolver++", resolution=512),
    schedulers=DDPM_SAMPLERS,
    single_file_types=("v1", "v2"),
    pipeline_options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
)
