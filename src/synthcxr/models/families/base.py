"""The `Family` contract: everything the rest of synthcxr asks about a model family, in one place.

A family is one object that answers questions (which pipeline class, which text encoders, how a
prompt becomes conditioning, how the denoiser is called, which objective trains it, which LoRA
targets, which sampling defaults, how a tiny test model is built). Training, generation, caching
and export call these methods and never branch on the family's name, so adding a family (PixArt-Σ,
Sana, Flux.1) means adding one file and one registry entry.

The defaults here fit a latent-diffusion pipeline with CLIP text encoders and an AutoencoderKL;
families override what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Conditioning = dict[str, Any]
"""Named tensors a denoiser takes besides the noisy latents (batch first), e.g. prompt_embeds, pooled."""


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a pipeline, named by the pipeline's attributes."""

    encoder: str
    """Pipeline attribute of the encoder ("text_encoder", "text_encoder_2", "text_encoder_3")."""
    tokenizer: str
    """Pipeline attribute of its tokenizer."""
    kind: str
    """clip | t5 | gemma. Only CLIP encoders can be trained (T5/Gemma are large and not trained in practice)."""

    @property
    def trainable(self) -> bool:
        return self.kind == "clip"


@dataclass(frozen=True)
class SampleDefaults:
    """Sampling settings used when the user does not give them."""

    steps: int
    guidance: float
    scheduler: str
    resolution: int
    """Native square resolution in pixels."""


@dataclass(frozen=True)
class Family:
    """A model family: diffusers classes plus the few functions that differ between families."""

    name: str
    label: str
    pipeline_class: str
    """diffusers pipeline class used to load, sample and save."""
    detect_classes: tuple[str, ...]
    """`_class_name` values in model_index.json that mean this family."""
    denoiser: str
    """Pipeline attribute of the denoiser: "unet" or "transformer"."""
    text_encoders: tuple[TextEncoderSlot, ...]
    objective: str
    """Training objective family: "ddpm" (epsilon / v-prediction) or "flow" (rectified flow matching)."""
    lora_targets: tuple[str, ...]
    """Default denoiser modules that get LoRA adapters (diffusers' training examples' choice)."""
    sample: SampleDefaults
    schedulers: tuple[str, ...]
    """Sampler names (generate/schedulers.py) that fit this family's objective."""
    methods: tuple[str, ...] = ("dreambooth", "full", "lora")
    text_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    single_file_types: tuple[str, ...] = ()
    """diffusers' `infer_diffusers_model_type` names of single-file checkpoints of this family."""
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments when loading/building the pipeline (e.g. no safety checker)."""

    # ------------------------------------------------------------------ classes
    def pipeline_cls(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def trainable_encoders(self) -> tuple[TextEncoderSlot, ...]:
        return tuple(slot for slot in self.text_encoders if slot.trainable)

    # ------------------------------------------------------------------ latents
    def vae_factor(self, vae: Any) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def patch_size(self, denoiser: Any) -> int:
        return int(getattr(denoiser.config, "patch_size", None) or 1)

    def resolution_multiple(self, vae: Any, denoiser: Any) -> int:
        """Resolutions must be a multiple of this (VAE factor x transformer patch)."""
        return self.vae_factor(vae) * self.patch_size(denoiser)

    def latent_shape(self, vae: Any, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.vae_factor(vae)
        return vae.config.latent_channels, side, side

    def latent_scale(self, vae: Any) -> tuple[float, float]:
        """(shift, scale): the denoiser sees (vae_latent - shift) * scale."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return float(shift), float(vae.config.scaling_factor)

    def native_resolution(self, pipe: Any) -> int:
        denoiser = getattr(pipe, self.denoiser)
        return int(denoiser.config.sample_size) * self.vae_factor(pipe.vae)

    # ------------------------------------------------------------------ conditioning
    def encode_prompts(self, encoders: dict[str, Any], tokenizers: dict[str, Any], prompts: list[str],
                       device: Any) -> Conditioning:
        """Prompts -> conditioning tensors for `denoise` (one row per prompt)."""
        raise NotImplementedError

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning, *, resolution: int) -> Any:
        """The denoiser's prediction for noisy latents at `timesteps` (model units) under `cond`."""
        raise NotImplementedError

    def prompt_kwargs(self, pipe: Any, prompt: str, negative: str, device: Any, guidance: bool) -> dict[str, Any]:
        """One prompt encoded by the pipeline itself, as keyword arguments of `pipe(...)` (batch of 1)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ pipelines and files
    def assemble(self, components: dict[str, Any]) -> Any:
        """A pipeline from its components (pipeline attribute name -> module)."""
        return self.pipeline_cls()(**components, **self.pipeline_options)

    def save_lora(self, out_dir: Path, layers: dict[str, Any], weight_name: str) -> None:
        """Save LoRA layers (pipeline attribute -> diffusers-format state dict) in the file format that
        this family's pipeline `load_lora_weights` reads."""
        kwargs = {f"{attr}_lora_layers": value for attr, value in layers.items() if value is not None}
        self.pipeline_cls().save_lora_weights(out_dir, **kwargs, weight_name=weight_name, safe_serialization=True)

    def make_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Any:
        """A tiny random pipeline of this family (real classes, tiny sizes), not yet saved."""
        raise NotImplementedError


# ---------------------------------------------------------------------- helpers shared by families
def tokenize(tokenizer: Any, prompts: list[str], device: Any, max_length: int | None = None) -> Any:
    """Token ids padded to the tokenizer's (or the given) length, as the pipelines do."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
