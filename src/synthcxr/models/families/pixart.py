"""PixArt-Σ (and -α): DiT transformer with adaLN-single, one T5 encoder (attention-masked, 300 tokens),
SD-style AutoencoderKL, DDPM epsilon prediction; the transformer also predicts a variance ("learned
sigma", out_channels = 2 x latent channels), which training and sampling drop as diffusers' pipeline does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthcxr.models.families.base import Conditioning, Family, SampleDefaults, TextEncoderSlot
from synthcxr.models.families.sd import DDPM_SAMPLERS

T5_MAX_LENGTH = 300
"""T5 tokens per prompt (PixArtSigmaPipeline's default max_sequence_length)."""


class PixArt(Family):
    def encode_prompts(self, encoders: dict[str, Any], tokenizers: dict[str, Any], prompts: list[str],
                       device: Any) -> Conditioning:
        # as PixArtSigmaPipeline.encode_prompt (clean_caption off): T5 with the padding masked out
        tokens = tokenizers["tokenizer"](prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                                         add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        embeds = encoders["text_encoder"](tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning, *, resolution: int) -> Any:
        import torch

        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if denoiser.config.sample_size == 128:  # PixArt-α 1024 micro-conditions, as its pipeline passes them
            n = len(noisy)
            added = {"resolution": torch.tensor([[resolution, resolution]], dtype=noisy.dtype,
                                                device=noisy.device).repeat(n, 1),
                     "aspect_ratio": torch.ones((n, 1), dtype=noisy.dtype, device=noisy.device)}
        timesteps = timesteps.expand(len(noisy)) if timesteps.ndim else timesteps[None].expand(len(noisy))
        pred = denoiser(noisy, encoder_hidden_states=cond["prompt_embeds"],
                        encoder_attention_mask=cond["prompt_attention_mask"], timestep=timesteps,
                        added_cond_kwargs=added, return_dict=False)[0]
        if denoiser.config.out_channels // 2 == noisy.shape[1]:  # learned sigma: keep the noise half
            pred = pred.chunk(2, dim=1)[0]
        return pred

    def prompt_kwargs(self, pipe: Any, prompt: str, negative: str, device: Any, guidance: bool) -> dict[str, Any]:
        pe, mask, npe, nmask = pipe.encode_prompt(prompt, do_classifier_free_guidance=guidance,
                                                  negative_prompt=negative or "", num_images_per_prompt=1,
                                                  device=device, clean_caption=False,
                                                  max_sequence_length=T5_MAX_LENGTH)
        return {"prompt_embeds": pe, "prompt_attention_mask": mask,
                "negative_prompt_embeds": npe if guidance else None,
                "negative_prompt_attention_mask": nmask if guidance else None,
                "negative_prompt": None, "max_sequence_length": T5_MAX_LENGTH, "clean_caption": False,
                # our resolution is the one asked for, not snapped to the pipeline's aspect-ratio bins
                "use_resolution_binning": False}

    def make_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Any:
        from synthcxr.models.families.tiny_parts import tiny_pixart

        return tiny_pixart(resolution=resolution, seed=seed)


PIXART = PixArt(
    name="pixart",
    label="PixArt-Σ / PixArt-α",
    pipeline_class="PixArtSigmaPipeline",
    detect_classes=("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
    denoiser="transformer",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", "t5"),),
    objective="ddpm",
    lora_targets=("to_k", "to_q", "to_v", "to_out.0"),
    # CheXGenBench's sampling for PixArt-Σ: 20 steps, guidance 4.5 (DPM-Solver++, the pipeline's scheduler)
    sample=SampleDefaults(steps=20, guidance=4.5, scheduler="dpmsolver++", resolution=1024),
    schedulers=DDPM_SAMPLERS,
    # diffusers has no LoRA loader for PixArt (no load_lora_weights, no PeftAdapterMixin): a LoRA is exported
    # merged into a pipeline folder and as a peft adapter folder, the two forms plain libraries load
    lora_file_loader=False,
)
