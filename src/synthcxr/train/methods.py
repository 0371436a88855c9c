"""Training methods as registry entries composed from small parts.

A method decides three things, each a small function shared between methods:
  1. which parameters train (whole UNet / peft adapters: LoRA, LoHa, LoKr, OFT; text encoder
     optionally, the same way);
  2. which prompt each image gets (DreamBooth instance prompt or the caption) - `MethodSection.prompt_mode`;
  3. how the final weights are saved (a diffusers pipeline folder, a LoRA file that
     `StableDiffusionPipeline.load_lora_weights` reads, or adapters merged into a pipeline folder where
     diffusers cannot load the adapter type) and the run's `synthcxr_model.json`.
Prior preservation (class images from the base model) works with every method.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthcxr.errors import ConfigError
from synthcxr.fileio import atomic_write_json, hash_strings
from synthcxr.logging_utils import get_logger
from synthcxr.train.config import MethodSection, TrainConfig

log = get_logger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class Models:
    """The pieces of a pipeline that training touches; `family` answers every family-specific question."""

    unet: Any  # the denoiser: a UNet (sd, sdxl) or a transformer (sd3); named `family.denoiser` in files
    vae: Any
    text_encoder: Any  # the first text encoder (every one is in `text_encoders`)
    tokenizer: Any
    scheduler: Any  # the pipeline's sampling scheduler (kept for export and validation)
    noise_scheduler: Any  # the training objective's scheduler, built from the same config
    family: Any = None
    """models.families.Family; None = Stable Diffusion 1.x/2.x."""
    text_encoders: dict[str, Any] = field(default_factory=dict)
    """Pipeline attribute -> text encoder (all of them; SDXL has two, SD3 three)."""
    tokenizers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family is None:
            from synthcxr.models.families import FAMILIES

            self.family = FAMILIES["sd"]
        self.text_encoders = self.text_encoders or {"text_encoder": self.text_encoder}
        self.tokenizers = self.tokenizers or {"tokenizer": self.tokenizer}

    def components(self) -> dict[str, Any]:
        """Pipeline constructor arguments."""
        encoders = {k: None if getattr(v, "dropped", False) else v for k, v in self.text_encoders.items()}
        return {self.family.denoiser: self.unet, "vae": self.vae, **encoders, **self.tokenizers,
                "scheduler": self.scheduler}


def trained_text_encoders(cfg: MethodSection, family: Any) -> list[str]:
    """Names of the text encoders that train: none, the ones listed, or every CLIP encoder of the family.

    T5 and Gemma encoders are refused: billions of parameters, and no recipe trains them."""
    if not cfg.train_text_encoder:
        return []
    slots = {slot.encoder: slot for slot in family.text_encoders}
    names = cfg.text_encoders if cfg.text_encoders is not None else [s.encoder for s in family.trainable_encoders()]
    clip = [s.encoder for s in family.trainable_encoders()]
    for name in names:
        if name not in slots:
            raise ConfigError(f"method.text_encoders names {name!r}, which {family.label} does not have",
                              fix=f"use some of: {', '.join(slots)}")
        if not slots[name].trainable:
            raise ConfigError(f"{family.label}'s {name} is a {slots[name].kind.upper()} encoder, which cannot be "
                              "trained (billions of parameters; it stays frozen and its outputs are cached)",
                              fix=f"train only CLIP encoders ({', '.join(clip) or 'this family has none'}) or set "
                                  "method.train_text_encoder=false")
    if not names:
        raise ConfigError(f"{family.label} has no CLIP text encoder to train", fix="set method.train_text_encoder=false")
    return list(names)


def lora_targets(cfg: MethodSection, family: Any) -> list[str]:
    """The denoiser modules that get adapters: the config's, else the family's default."""
    return list(cfg.target_modules) if cfg.target_modules is not None else list(family.lora_targets)


# --------------------------------------------------------------------------- 1. trainable parameters
def _freeze(module: Any, cfg: MethodSection) -> None:
    module.requires_grad_(False)


def _train_all(module: Any, cfg: MethodSection) -> None:
    module.requires_grad_(True)


def _lora_config(cfg: MethodSection, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                      lora_dropout=cfg.dropout, use_dora=cfg.dora, init_lora_weights="gaussian",
                      target_modules=targets)


def _loha_config(cfg: MethodSection, targets: list[str]):
    from peft import LoHaConfig

    return LoHaConfig(r=cfg.rank, alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                      module_dropout=cfg.dropout, target_modules=targets)


def _lokr_config(cfg: MethodSection, targets: list[str]):
    from peft import LoKrConfig

    return LoKrConfig(r=cfg.rank, alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                      module_dropout=cfg.dropout, decompose_factor=cfg.decompose_factor, target_modules=targets)


def _oft_config(cfg: MethodSection, targets: list[str]):
    from peft import OFTConfig

    return OFTConfig(r=0, oft_block_size=cfg.block_size, module_dropout=cfg.dropout, target_modules=targets)


ADAPTER_CONFIGS: dict[str, Callable[[MethodSection, list[str]], Any]] = {
    "lora": _lora_config, "loha": _loha_config, "lokr": _lokr_config, "oft": _oft_config,
}
"""method name -> its peft config; every adapter starts as the identity (the base model's outputs)."""


def _adapter_config(cfg: MethodSection, targets: list[str]):
    return ADAPTER_CONFIGS[cfg.name](cfg, targets)


def _check_block_size(module: Any, cfg: MethodSection, what: str) -> None:
    """peft quietly changes an OFT block size that does not divide a layer's width; a study must not."""
    if cfg.name != "oft":
        return
    bad = sorted({(type(m).__name__, m.in_features, m.oft_block_size["default"]) for m in module.modules()
                  if "default" in getattr(m, "oft_block_size", {}) and m.oft_block_size["default"] != cfg.block_size})
    if bad:
        widths = sorted({w for _, w, _ in bad})
        raise ConfigError(f"method.block_size={cfg.block_size} does not divide the input width of some {what} "
                          f"target layers (widths {widths}; peft would silently use other block sizes)",
                          fix=f"set method.block_size to a divisor of every one of {widths} "
                              f"(their greatest common divisor is {math.gcd(*widths)})")


def _unet_adapter(unet: Any, cfg: MethodSection) -> None:
    unet.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Invalid `oft_block_size`")  # checked below, as an error
            if hasattr(unet, "add_adapter"):
                unet.add_adapter(_adapter_config(cfg, cfg.target_modules))
            else:  # a denoiser without diffusers' PeftAdapterMixin (PixArt): peft's own injection, same keys
                from peft import inject_adapter_in_model

                inject_adapter_in_model(_adapter_config(cfg, cfg.target_modules), unet)
    except ValueError as exc:
        raise ConfigError(f"method {cfg.name} cannot adapt the UNet's {cfg.target_modules}: {exc}",
                          fix="change method.target_modules, method.rank or method.block_size") from exc
    _check_block_size(unet, cfg, "UNet")


def _text_adapter(text_encoder: Any, cfg: MethodSection) -> None:
    # peft's own injection: transformers' `add_adapter` wants a newer peft than diffusers needs
    from peft import inject_adapter_in_model

    text_encoder.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Invalid `oft_block_size`")  # checked below, as an error
            inject_adapter_in_model(_adapter_config(cfg, cfg.text_encoder_target_modules), text_encoder)
    except ValueError as exc:
        raise ConfigError(f"method {cfg.name} cannot adapt the text encoder's {cfg.text_encoder_target_modules}: "
                          f"{exc}", fix="change method.text_encoder_target_modules or method.block_size") from exc
    _check_block_size(text_encoder, cfg, "text encoder")


# --------------------------------------------------------------------------- 3. export
def pipeline_for(models: Models):
    """The family's diffusers pipeline around these modules (for sampling and saving)."""
    return models.family.assemble(models.components())


def _export_pipeline(models: Models, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Full weights: a diffusers folder that the family's pipeline class (`from_pretrained`) loads."""
    from synthcxr.models.load import library_progress_bars_off

    with library_progress_bars_off():
        pipeline_for(models).save_pretrained(out_dir, safe_serialization=True)
    return {"pipeline": out_dir.name, "lora": None}


def _export_lora(models: Models, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """LoRA: diffusers' own file format, so a plain pipeline loads it with load_lora_weights."""
    family = models.family
    layers = {family.denoiser: family.lora_state_dict(models.unet)}
    for name in trained_text_encoders(cfg.method, family):
        layers[name] = family.lora_state_dict(models.text_encoders[name])
    family.save_lora(out_dir, layers, LORA_FILE)
    return {"pipeline": None, "lora": f"{out_dir.name}/{LORA_FILE}"}


def merge_adapters(module: Any) -> Any:
    """Fold every peft adapter layer into its base layer and put the plain base layer back in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, BaseTunerLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer())
    return module


def _export_merged(models: Models, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Adapters merged into a fresh full-precision copy of the base model, saved as a pipeline folder.

    diffusers' StableDiffusionPipeline.load_lora_weights reads LoRA keys only (it refuses LoHa, LoKr
    and OFT files), so these adapters leave training as a plain pipeline any diffusers loads. The base
    is reloaded rather than merged in place: under mixed precision the frozen weights were held in
    bf16/fp16, and the export should not carry that rounding.
    """
    import torch
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from synthcxr.models.load import library_progress_bars_off, load_pipeline

    family = models.family
    pipe = load_pipeline(cfg.model.path, prediction_type=cfg.model.prediction_type,
                         single_file_config=cfg.model.single_file_config, load_lora=False, family=family.name,
                         drop_t5=cfg.model.drop_t5)  # a T5 the run trained without stays out of the export
    fresh = Models(unet=getattr(pipe, family.denoiser), vae=pipe.vae, text_encoder=pipe.text_encoder,
                   tokenizer=pipe.tokenizer, scheduler=models.scheduler, noise_scheduler=None, family=family,
                   text_encoders={s.encoder: getattr(pipe, s.encoder) for s in family.text_encoders},
                   tokenizers={s.tokenizer: getattr(pipe, s.tokenizer) for s in family.text_encoders})
    for module in (fresh.unet, fresh.vae, *fresh.text_encoders.values()):
        if module is not None and module.dtype != torch.float32:  # (.to() on an fp32 model only prints a diffusers notice)
            module.to(torch.float32)
    parts = [("unet", models.unet, fresh.unet, lora_targets(cfg.method, family))]
    for name in trained_text_encoders(cfg.method, family):
        parts.append((name, models.text_encoders[name], fresh.text_encoders[name], cfg.method.text_encoder_target_modules))
    for _, trained, target, targets in parts:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(_adapter_config(cfg.method, targets), target)
        weights = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(trained).items()}
        result = set_peft_model_state_dict(target, weights)
        if result.unexpected_keys:
            raise RuntimeError(f"adapter weights did not fit the reloaded base model: {result.unexpected_keys[:3]}")
        merge_adapters(target)
    with library_progress_bars_off():
        pipeline_for(fresh).save_pretrained(out_dir, safe_serialization=True)
    return {"pipeline": out_dir.name, "lora": None, "merged_adapter": cfg.method.name}


PEFT_FOLDER = "peft_adapter"


def _export_merged_and_peft(models: Models, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """LoRA of a family whose pipeline has no LoRA loader (PixArt-Σ): merged as `_export_merged` does, and the
    adapter as a peft folder (`final/peft_adapter`) that `PeftModel.from_pretrained(pipe.transformer, folder)` loads."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    info = _export_merged(models, out_dir, cfg)
    folder = out_dir / PEFT_FOLDER
    _adapter_config(cfg.method, lora_targets(cfg.method, models.family)).save_pretrained(str(folder))
    # PeftModel.save_pretrained's key layout: the wrapped model's names under base_model.model.
    weights = {f"base_model.model.{k}": v.detach().to("cpu", torch.float32).contiguous()
               for k, v in get_peft_model_state_dict(models.unet).items()}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return {**info, "peft_adapter": f"{out_dir.name}/{PEFT_FOLDER}"}


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Method:
    name: str
    unet: Callable[[Any, MethodSection], None]
    text_encoder: Callable[[Any, MethodSection], None]
    export: Callable[[Models, Path, TrainConfig], dict[str, Any]]
    full_weights: bool
    """Trainable parameters are whole weights (kept fp32 as master weights under mixed precision)."""


METHODS: dict[str, Method] = {
    "dreambooth": Method("dreambooth", _train_all, _train_all, _export_pipeline, full_weights=True),
    "full": Method("full", _train_all, _train_all, _export_pipeline, full_weights=True),
    "lora": Method("lora", _unet_adapter, _text_adapter, _export_lora, full_weights=False),
    **{name: Method(name, _unet_adapter, _text_adapter, _export_merged, full_weights=False)
       for name in ("loha", "lokr", "oft")},
}


def method_for(cfg: MethodSection, family: Any = None) -> Method:
    """The registry entry, with the export the config asks for (method.export=merged for a LoRA) or the family
    allows (a LoRA of a family without a LoRA loader: merged plus a peft adapter folder)."""
    from dataclasses import replace

    method = METHODS[cfg.name]
    if method.export is _export_lora and family is not None and not family.lora_file_loader:
        method = replace(method, export=_export_merged_and_peft)
    elif cfg.export == "merged" and method.export is _export_lora:
        method = replace(method, export=_export_merged)
    return method


def apply_method(models: Models, cfg: MethodSection) -> Method:
    """Set requires_grad / add adapters; the VAE never trains."""
    method = method_for(cfg, models.family)
    models.vae.requires_grad_(False)
    method.unet(models.unet, cfg.model_copy(update={"target_modules": lora_targets(cfg, models.family)}))
    trained = trained_text_encoders(cfg, models.family)
    for name, encoder in models.text_encoders.items():
        (method.text_encoder if name in trained else _freeze)(encoder, cfg)
    return method


def trainable_named_parameters(models: Models) -> dict[str, Any]:
    """Every trainable parameter under a stable name ("unet.<name>" or "transformer.<name>", "text_encoder.<name>")."""
    out = {}
    for prefix, module in ((models.family.denoiser, models.unet), *models.text_encoders.items()):
        for name, param in module.named_parameters():
            if param.requires_grad:
                out[f"{prefix}.{name}"] = param
    return out


def param_groups(models: Models, cfg: TrainConfig) -> list[dict[str, Any]]:
    """UNet and text encoder parameters as optimizer groups (the text encoder may have its own lr)."""
    groups = []
    unet_params = [p for p in models.unet.parameters() if p.requires_grad]
    text_params = [p for m in models.text_encoders.values() for p in m.parameters() if p.requires_grad]
    lr = cfg.optimizer.effective_lr
    if unet_params:
        groups.append({"params": unet_params, **({"lr": lr} if lr is not None else {})})
    if text_params:
        text_lr = cfg.method.text_encoder_lr if cfg.method.text_encoder_lr is not None else lr
        groups.append({"params": text_params, **({"lr": text_lr} if text_lr is not None else {})})
    return groups


def export_final(method: Method, models: Models, run_root: Path, cfg: TrainConfig, base_model: str) -> Path:
    """Write final weights and `synthcxr_model.json` so `synthcxr generate --model RUN_DIR` works."""
    from synthcxr.models.load import RUN_MODEL_FILE

    final = run_root / "final"
    final.mkdir(parents=True, exist_ok=True)
    info = method.export(models, final, cfg)
    atomic_write_json(run_root / RUN_MODEL_FILE, {"base_model": base_model, **info, "method": method.name,
                                                   "family": models.family.name, "drop_t5": cfg.model.drop_t5})
    return final


# --------------------------------------------------------------------------- 2. prompts
def instance_prompt(cfg: TrainConfig) -> str:
    if cfg.method.instance_prompt:
        return cfg.method.instance_prompt
    from synthcxr.data.captions import instance_prompt as data_instance_prompt

    return data_instance_prompt(cfg.data.captions)


def class_prompt(cfg: TrainConfig) -> str:
    if cfg.method.class_prompt:
        return cfg.method.class_prompt
    from synthcxr.data.captions import class_prompt as data_class_prompt

    return data_class_prompt(cfg.data.captions)


def prompt_for(record: Any, cfg: TrainConfig) -> str:
    if cfg.method.prompt_mode == "instance":
        return instance_prompt(cfg)
    if record.caption:
        return record.caption
    from synthcxr.data.captions import caption_for

    return caption_for(record, cfg.data.captions)


# --------------------------------------------------------------------------- prior preservation
def class_images_dir(cache_root: Path, cfg: TrainConfig, model_fingerprint: str) -> Path:
    key = hash_strings([model_fingerprint, class_prompt(cfg), str(cfg.data.resolution),
                        str(cfg.method.class_image_steps), str(cfg.method.class_image_guidance)])[:16]
    return cache_root / "class_images" / key


def ensure_class_images(models: Models, cfg: TrainConfig, folder: Path, device: Any, dtype: Any) -> list[Path]:
    """Generate the class images once with the *base* model (before any training); reuse them after.

    Image i always uses seed i, and finished images are never redone, so an interrupted generation
    continues where it stopped and every run on the same model + prompt shares the same set.
    """
    import torch

    from synthcxr.fileio import atomic_write_bytes
    from synthcxr.logging_utils import progress_bar

    n = cfg.method.num_class_images
    paths = [folder / f"class_{i:05d}.png" for i in range(n)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if not todo:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_for(models)
    pipe.set_progress_bar_config(disable=True)
    prompt = class_prompt(cfg)
    log.info("generating %d class images for prior preservation (%r) into %s", len(todo), prompt, folder)
    import io

    with progress_bar(len(todo), "class images") as (progress, task), torch.autocast(device.type, dtype=dtype,
                                                                                     enabled=dtype != torch.float32):
        for i in todo:
            generator = torch.Generator(device="cpu").manual_seed(i)
            image = pipe(prompt, num_inference_steps=cfg.method.class_image_steps,
                         guidance_scale=cfg.method.class_image_guidance, generator=generator,
                         height=cfg.data.resolution, width=cfg.data.resolution).images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write_bytes(paths[i], buf.getvalue())
            progress.advance(task)
    return paths
