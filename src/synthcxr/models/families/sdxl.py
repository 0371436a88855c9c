"""Stable Diffusion XL: UNet with text-time conditioning, two CLIP encoders (penultimate hidden states
concatenated; pooled embedding of the second), AutoencoderKL, epsilon prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthcxr.models.families.base import Conditioning, Family, SampleDefaults, TextEncoderSlot, tokenize
from synthcxr.models.families.sd import DDPM_SAMPLERS


class StableDiffusionXL(Family):
    def encode_prompts(self, encoders: dict[str, Any], tokenizers: dict[str, Any], prompts: list[str],
                       device: Any) -> Conditioning:
        import torch

        # as StableDiffusionXLPipeline.encode_prompt (clip_skip None): penultimate layer of each
        # encoder, concatenated; the pooled embedding is the second encoder's projection
        hidden, pooled = [], None
        for slot in self.text_encoders:
            ids = tokenize(tokenizers[slot.tokenizer], prompts, device)
            out = encoders[slot.encoder](ids, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning, *, resolution: int) -> Any:
        embeds = cond["prompt_embeds"]
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids(len(noisy), resolution, embeds)}
        return denoiser(noisy, timesteps, embeds, added_cond_kwargs=added, return_dict=False)[0]

    def prompt_kwargs(self, pipe: Any, prompt: str, negative: str, device: Any, guidance: bool) -> dict[str, Any]:
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=guidance,
                                                      negative_prompt=negative or None)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": npe if guidance else None,
                "negative_pooled_prompt_embeds": npooled if guidance else None}

    def make_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Any:
        from synthcxr.models.families.tiny_parts import tiny_sdxl

        return tiny_sdxl(resolution=resolution, seed=seed, tokenizer_dir=out_dir)


def time_ids(batch: int, resolution: int, like: Any) -> Any:
    """SDXL's micro-conditioning: (original size, crop top-left, target size); square, uncropped."""
    import torch

    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=like.dtype, device=like.device)
    return ids.repeat(batch, 1)


SDXL = StableDiffusionXL(
    name="sdxl",
    label="Stable Diffusion XL",
    pipeline_class="StableDiffusionXLPipeline",
    detect_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    denoiser="unet",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", "clip"),
                   TextEncoderSlot("text_encoder_2", "tokenizer_2", "clip")),
    objective="ddpm",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    sample=SampleDefaults(steps=30, guidance=5.0, scheduler="euler", resolution=1024),
    schedulers=DDPM_SAMPLERS,
    single_file_types=("xl_base",),
    pipeline_options={"add_watermarker": False},
)
