"""Flux.1: MMDiT + single-stream transformer on 2x2-packed latents, CLIP-L (pooled) + T5, AutoencoderKL with
a shift factor, rectified flow matching with resolution-dependent shift, and a guidance embedding
("dev": guidance is an input of the model, not classifier-free guidance). Full fine-tuning is refused."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from synthcxr.models.families.base import Conditioning, Family, SampleDefaults, TextEncoderSlot, tokenize

T5_MAX_LENGTH = 512
"""T5 tokens per prompt (FluxPipeline's and diffusers' Flux training example's default)."""
TRAIN_GUIDANCE = 3.5
"""Guidance-embedding value while training a guidance-distilled model (diffusers' Flux example default)."""
FULL_REFUSAL = ("Flux.1 has 12 B transformer parameters: full fine-tuning with AdamW needs about 190 GB for fp32 "
                "weights, gradients and optimizer states alone (about 120 GB with bf16 weights and 8-bit AdamW), "
                "more than one GPU holds; use method.name=lora (the public benchmark's Flux.1-dev recipe, r32)")


class Flux(Family):
    def patch_size(self, denoiser: Any) -> int:
        return 2  # latents are packed 2x2 into tokens (the transformer's own patch_size is 1)

    def resolution_multiple_of_folder(self, folder: Path) -> int | None:
        multiple = super().resolution_multiple_of_folder(folder)
        return multiple * 2 if multiple else None

    def native_resolution(self, pipe: Any) -> int:
        return int(pipe.vae.config.sample_size)  # the transformer has no sample size; the VAE's is 1024

    def encode_prompts(self, encoders: dict[str, Any], tokenizers: dict[str, Any], prompts: list[str],
                       device: Any) -> Conditioning:
        # as FluxPipeline.encode_prompt: CLIP's pooled output + T5's last hidden states
        pooled = encoders["text_encoder"](tokenize(tokenizers["tokenizer"], prompts, device),
                                          output_hidden_states=False).pooler_output
        t5 = encoders["text_encoder_2"](tokenize(tokenizers["tokenizer_2"], prompts, device, T5_MAX_LENGTH),
                                        output_hidden_states=False)[0]
        return {"prompt_embeds": t5, "pooled_prompt_embeds": pooled}

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning, *, resolution: int) -> Any:
        import torch
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        embeds = cond["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (torch.full((b,), TRAIN_GUIDANCE, device=noisy.device, dtype=torch.float32)
                    if denoiser.config.guidance_embeds else None)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def decode(self, vae: Any, latents: Any) -> Any:
        """The pipeline returns packed latents (batch, tokens, 4 x channels): unpack, then decode."""
        from diffusers import FluxPipeline

        if latents.ndim == 3:
            side = 2 * math.isqrt(latents.shape[1])
            latents = FluxPipeline._unpack_latents(latents, side, side, 1)
        return super().decode(vae, latents)

    def prompt_kwargs(self, pipe: Any, prompt: str, negative: str, device: Any, guidance: bool) -> dict[str, Any]:
        # guidance is the distilled model's embedding (guidance_scale), not classifier-free: no negative pass
        pe, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                                           max_sequence_length=T5_MAX_LENGTH)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "max_sequence_length": T5_MAX_LENGTH}

    def make_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Any:
        from synthcxr.models.families.tiny_parts import tiny_flux

        return tiny_flux(resolution=resolution, seed=seed)


FLUX = Flux(
    name="flux",
    label="Flux.1",
    pipeline_class="FluxPipeline",
    detect_classes=("FluxPipeline",),
    denoiser="transformer",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", "clip"),
                   TextEncoderSlot("text_encoder_2", "tokenizer_2", "t5")),
    objective="flow",
    # diffusers' train_dreambooth_lora_flux.py default: attention of both streams and the feed-forwards
    lora_targets=("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2"),
    # FluxPipeline's recommendation for dev: 28 steps, guidance 3.5, 1024 px
    sample=SampleDefaults(steps=28, guidance=3.5, scheduler="flow_euler", resolution=1024),
    schedulers=("flow_euler",),
    refused_methods={"full": FULL_REFUSAL, "dreambooth": FULL_REFUSAL},
    lora_key_format="peft",
)
