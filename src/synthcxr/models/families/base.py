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
    optional: bool = False
    """The pipeline works without it (SD3's T5: zeros in its place); `model.drop_t5` leaves it out."""

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
    refused_methods: dict[str, str] = field(default_factory=dict)
    """Training methods this family cannot use -> the reason (e.g. full fine-tuning of a 12B model)."""
    text_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    single_file_types: tuple[str, ...] = ()
    """diffusers' `infer_diffusers_model_type` names of single-file checkpoints of this family."""
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments when loading/building the pipeline (e.g. no safety checker)."""
    lora_file_loader: bool = True
    """The pipeline has `load_lora_weights`. Without one (PixArt-Σ) a LoRA leaves training merged into a
    pipeline folder plus a peft adapter folder (`PeftModel.from_pretrained(pipe.transformer, folder)`)."""
    lora_key_format: str = "diffusers"
    """LoRA file keys: "diffusers" (lora.down/up; SD and SDXL examples convert to it) or "peft" (lora_A/B;
    the SD3/Flux/Sana examples save peft keys as they are, and their loaders expect them)."""

    # ------------------------------------------------------------------ classes
    def pipeline_cls(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def trainable_encoders(self) -> tuple[TextEncoderSlot, ...]:
        return tuple(slot for slot in self.text_encoders if slot.trainable)

    def droppable_t5(self) -> tuple[TextEncoderSlot, ...]:
        """T5 encoders that `model.drop_t5` may leave out (none: the family needs its T5)."""
        return tuple(slot for slot in self.text_encoders if slot.kind == "t5" and slot.optional)

    def dropped_encoder(self, pipe: Any, slot: TextEncoderSlot) -> Any:
        """A module in place of a dropped encoder that gives what the pipeline uses without it."""
        raise NotImplementedError(f"{self.label} cannot drop {slot.encoder}")

    # ------------------------------------------------------------------ latents
    def resolution_multiple_of_folder(self, folder: Path) -> int | None:
        """`resolution_multiple` read from a diffusers folder's config files (no weights loaded); None if absent."""
        import json

        try:
            vae = json.loads((folder / "vae" / "config.json").read_text())
            denoiser = json.loads((folder / self.denoiser / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return 2 ** (len(vae.get(self.vae_levels_key, [0])) - 1) * int(denoiser.get("patch_size") or 1)

    # the VAE config key whose length is its number of resolution levels (AutoencoderKL's; DC-AE differs)
    vae_levels_key = "block_out_channels"

    def vae_factor(self, vae: Any) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(getattr(vae.config, self.vae_levels_key)) - 1)

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

    def encode_params(self, vae: Any, pixels: Any) -> Any:
        """[-1, 1] images -> latent-distribution parameters (mean, log-variance stacked on channels)."""
        return vae.encode(pixels.to(dtype=vae.dtype)).latent_dist.parameters

    def decode(self, vae: Any, latents: Any) -> Any:
        """Denoiser latents -> images in [-1, 1] (undoing `latent_scale`; fp16 VAEs that ask for it upcast)."""
        import torch

        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # SDXL's VAE overflows in fp16, as its pipeline knows
        shift, scale = self.latent_scale(vae)
        return vae.decode(latents.to(vae.dtype) / scale + shift, return_dict=False)[0]

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

    def lora_state_dict(self, module: Any) -> dict[str, Any]:
        """A module's trained adapter weights, keyed as this family's LoRA loader expects."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(module)
        if self.lora_key_format == "diffusers":
            from diffusers.utils import convert_state_dict_to_diffusers

            state = convert_state_dict_to_diffusers(state)
        return state

    def save_lora(self, out_dir: Path, layers: dict[str, Any], weight_name: str) -> None:
        """Save LoRA layers (pipeline attribute -> diffusers-format state dict) in the file format that
        this family's pipeline `load_lora_weights` reads."""
        kwargs = {f"{attr}_lora_layers": value for attr, value in layers.items() if value is not None}
        self.pipeline_cls().save_lora_weights(out_dir, **kwargs, weight_name=weight_name, safe_serialization=True)

    def make_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Any:
        """A tiny random pipeline of this family (real classes, tiny sizes), not yet saved."""
        raise NotImplementedError

    def write_tiny(self, out_dir: Path, *, resolution: int, seed: int, **options: Any) -> Path:
        """Build the tiny pipeline and save it as a diffusers folder (for tests and demos)."""
        import json

        from synthcxr.models.load import library_progress_bars_off

        out_dir = Path(out_dir)
        pipe = self.make_tiny(out_dir, resolution=resolution, seed=seed, **options)
        with library_progress_bars_off():
            pipe.save_pretrained(out_dir, safe_serialization=True)
        (out_dir / "synthcxr_tiny.json").write_text(json.dumps(
            {"family": self.name, "sample_size": resolution, "seed": seed, **options,
             "note": "random weights; for tests and demos only"}))
        return out_dir


# ---------------------------------------------------------------------- helpers shared by families
def tokenize(tokenizer: Any, prompts: list[str], device: Any, max_length: int | None = None) -> Any:
    """Token ids padded to the tokenizer's (or the given) length, as the pipelines do."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
