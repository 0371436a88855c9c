"""Stable Diffusion 3 / 3.5: MMDiT transformer, CLIP-L + CLIP-G + T5, AutoencoderKL with a shift
factor (16 latent channels on real weights), rectified flow matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthcxr.models.families.base import Conditioning, Family, SampleDefaults, TextEncoderSlot, tokenize

T5_MAX_LENGTH = 77
"""T5 tokens per prompt, in training and in generation (diffusers' SD3 training example uses 77)."""


class StableDiffusion3(Family):
    def encode_prompts(self, encoders: dict[str, Any], tokenizers: dict[str, Any], prompts: list[str],
                       device: Any) -> Conditioning:
        import torch
        import torch.nn.functional as F

        # as StableDiffusion3Pipeline.encode_prompt (clip_skip None): penultimate CLIP layers side by
        # side, zero-padded to T5's width, then T5's tokens after them; pooled = both CLIP projections
        clip_hidden, pooled = [], []
        for slot in self.text_encoders[:2]:
            ids = tokenize(tokenizers[slot.tokenizer], prompts, device)
            out = encoders[slot.encoder](ids, output_hidden_states=True)
            pooled.append(out[0])
            clip_hidden.append(out.hidden_states[-2])
        clip = torch.cat(clip_hidden, dim=-1)
        ids = tokenize(tokenizers["tokenizer_3"], prompts, device, max_length=T5_MAX_LENGTH)
        t5 = encoders["text_encoder_3"](ids)[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning, *, resolution: int) -> Any:
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

    def prompt_kwargs(self, pipe: Any, prompt: str, negative: str, device: Any, guidance: bool) -> dict[str, Any]:
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt, prompt_2=None, prompt_3=None, device=device,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=guidance,
                                                      negative_prompt=negative or None,
                                                      max_sequence_length=T5_MAX_LENGTH)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": npe if guidance else None,
                "negative_pooled_prompt_embeds": npooled if guidance else None,
                "max_sequence_length": T5_MAX_LENGTH}

    def dropped_encoder(self, pipe: Any, slot: TextEncoderSlot) -> Any:
        from synthcxr.models.families.dropped import DroppedEncoder

        # StableDiffusion3Pipeline without T5: zeros as wide as the transformer's joint attention input
        return DroppedEncoder(pipe.transformer.config.joint_attention_dim)

    def make_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Any:
        from synthcxr.models.families.tiny_parts import tiny_sd3

        return tiny_sd3(resolution=resolution, seed=seed, tokenizer_dir=out_dir)


SD3 = StableDiffusion3(
    name="sd3",
    label="Stable Diffusion 3 / 3.5",
    pipeline_class="StableDiffusion3Pipeline",
    detect_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    denoiser="transformer",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", "clip"),
                   TextEncoderSlot("text_encoder_2", "tokenizer_2", "clip"),
                   TextEncoderSlot("text_encoder_3", "tokenizer_3", "t5", optional=True)),
    objective="flow",
    # diffusers' train_dreambooth_lora_sd3.py default: joint attention, both streams
    lora_targets=("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                  "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"),
    sample=SampleDefaults(steps=40, guidance=4.5, scheduler="flow_euler", resolution=1024),
    schedulers=("flow_euler",),
    single_file_types=("sd3", "sd35_medium", "sd35_large"),
    lora_key_format="peft",
)
