"""Sana: linear-attention DiT (patch 1), Gemma-2 text encoder prompted with Sana's "complex human
instruction", DC-AE (`AutoencoderDC`, 32x compression on real weights, deterministic latents),
rectified flow matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthcxr.models.families.base import Conditioning, Family, SampleDefaults, TextEncoderSlot

MAX_LENGTH = 300
"""Prompt tokens kept after the instruction (SanaPipeline's default max_sequence_length)."""


def complex_human_instruction() -> list[str]:
    """The instruction SanaPipeline prepends by default (read from the installed diffusers, so training and
    sampling use the same text; diffusers' Sana training example does the same)."""
    import inspect

    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class Sana(Family):
    vae_levels_key = "encoder_block_out_channels"  # DC-AE: x32 on the released weights

    def encode_params(self, vae: Any, pixels: Any) -> Any:
        """DC-AE latents are deterministic: mean = the latent, log-variance at the floor `sample_latents` clamps
        to (std 3e-7, far below bf16 resolution), so the shared cache and sampling code apply unchanged."""
        import torch

        z = vae.encode(pixels.to(dtype=vae.dtype), return_dict=False)[0]
        return torch.cat([z, torch.full_like(z, -30.0)], dim=1)

    def encode_prompts(self, encoders: dict[str, Any], tokenizers: dict[str, Any], prompts: list[str],
                       device: Any) -> Conditioning:
        # as SanaPipeline.encode_prompt with its default instruction: instruction + prompt through Gemma-2,
        # then keep the first token and the last MAX_LENGTH - 1 (paper, section 3.1)
        tokenizer = tokenizers["tokenizer"]
        tokenizer.padding_side = "right"
        chi = "\n".join(complex_human_instruction())
        length = len(tokenizer.encode(chi)) + MAX_LENGTH - 2
        tokens = tokenizer([chi + p for p in prompts], padding="max_length", max_length=length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        embeds = encoders["text_encoder"](tokens.input_ids.to(device), attention_mask=mask)[0]
        keep = [0, *range(-MAX_LENGTH + 1, 0)]
        return {"prompt_embeds": embeds[:, keep], "prompt_attention_mask": mask[:, keep]}

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning, *, resolution: int) -> Any:
        pred = denoiser(noisy, encoder_hidden_states=cond["prompt_embeds"],
                        encoder_attention_mask=cond["prompt_attention_mask"],
                        timestep=timesteps * denoiser.config.timestep_scale, return_dict=False)[0]
        if denoiser.config.out_channels // 2 == noisy.shape[1]:  # learned sigma, as the pipeline drops it
            pred = pred.chunk(2, dim=1)[0]
        return pred

    def prompt_kwargs(self, pipe: Any, prompt: str, negative: str, device: Any, guidance: bool) -> dict[str, Any]:
        pe, mask, npe, nmask = pipe.encode_prompt(prompt, do_classifier_free_guidance=guidance,
                                                  negative_prompt=negative or "", num_images_per_prompt=1,
                                                  device=device, clean_caption=False, max_sequence_length=MAX_LENGTH,
                                                  complex_human_instruction=complex_human_instruction())
        return {"prompt_embeds": pe, "prompt_attention_mask": mask,
                "negative_prompt_embeds": npe if guidance else None,
                "negative_prompt_attention_mask": nmask if guidance else None,
                "negative_prompt": None, "max_sequence_length": MAX_LENGTH, "clean_caption": False,
                "use_resolution_binning": False}

    def make_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Any:
        from synthcxr.models.families.tiny_parts import tiny_sana

        return tiny_sana(resolution=resolution, seed=seed)


SANA = Sana(
    name="sana",
    label="Sana",
    pipeline_class="SanaPipeline",
    detect_classes=("SanaPipeline",),
    denoiser="transformer",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", "gemma"),),
    objective="flow",
    lora_targets=("to_k", "to_q", "to_v"),  # diffusers' train_dreambooth_lora_sana.py default
    # CheXGenBench's sampling for Sana: 20 steps, guidance 4.5
    sample=SampleDefaults(steps=20, guidance=4.5, scheduler="flow_euler", resolution=1024),
    schedulers=("flow_euler",),
    lora_key_format="peft",
)
