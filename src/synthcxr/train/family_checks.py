"""Checks of a training config against its model family, run before anything is loaded or written.

The family comes from model_index.json (a few bytes) or `model.family`, so a method the family
cannot use, a T5 text-encoder request, an objective option of the other objective, or a resolution
the VAE and patch size cannot take fail at once, each with its fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthcxr.errors import ConfigError


def check_family_config(cfg: Any) -> Any:
    """Return the run's family after checking `cfg` (a TrainConfig) against it."""
    from synthcxr.models.families import family_for
    from synthcxr.models.load import resolve_source
    from synthcxr.models.quantize import check_quantize_config
    from synthcxr.train.methods import trained_text_encoders

    source = resolve_source(cfg.model.path)
    location = resolve_source(source.location).location if source.kind == "run" else source.location
    family = family_for(location, cfg.model.family or source.family, cfg.model.single_file_config)
    if source.kind == "file" or (source.kind == "run" and Path(location).expanduser().is_file()):
        from synthcxr.models.families.single_file import check_single_file_config

        check_single_file_config(Path(location).expanduser(), family, cfg.model.single_file_config)
    if cfg.method.name in family.refused_methods:
        raise ConfigError(f"method {cfg.method.name} is not possible for {family.label}: "
                          f"{family.refused_methods[cfg.method.name]}", fix="choose another method.name")
    if cfg.method.export == "lora_file" and not family.lora_file_loader:
        raise ConfigError(f"method.export=lora_file: {family.pipeline_class} has no LoRA loader in diffusers (no "
                          "load_lora_weights), so the file could not be used outside synthcxr",
                          fix="remove method.export: the LoRA is exported merged into a pipeline folder and as a "
                              "peft adapter folder (final/peft_adapter)")
    if cfg.model.drop_t5 and not family.droppable_t5():
        raise ConfigError(f"model.drop_t5: {family.label} has no T5 text encoder to drop (or cannot work without it)",
                          fix="remove model.drop_t5")
    trained_text_encoders(cfg.method, family)  # raises for T5/Gemma or unknown encoder names
    check_quantize_config(cfg)
    if family.objective != "ddpm":
        if cfg.model.prediction_type is not None:
            raise ConfigError(f"model.prediction_type does not apply to {family.label} (flow matching)",
                              fix="remove model.prediction_type")
        if cfg.train.min_snr_gamma is not None:
            raise ConfigError("train.min_snr_gamma is defined for epsilon/v-prediction, not for flow matching "
                              f"({family.label})", fix="unset train.min_snr_gamma; use objective.weighting instead")
    folder = Path(location).expanduser()
    multiple = family.resolution_multiple_of_folder(folder) if folder.is_dir() else None
    if multiple and cfg.data.resolution % multiple:
        down = max(multiple, cfg.data.resolution // multiple * multiple)
        raise ConfigError(f"data.resolution {cfg.data.resolution} is not a multiple of {multiple} "
                          f"({family.label}: VAE downsampling x patch size)",
                          fix=f"set data.resolution to a multiple of {multiple}, e.g. {down} or {down + multiple}")
    return family
