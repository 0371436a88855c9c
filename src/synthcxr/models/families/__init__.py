"""Model families by name, and which family a model folder or file belongs to.

`FAMILIES` is the registry (name -> `Family`); `detect()` reads a diffusers folder's
`model_index.json` (its pipeline class); `family_for()` applies a `model.family` override.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from synthcxr.errors import ModelError, did_you_mean
from synthcxr.models.families.base import Conditioning, Family, SampleDefaults, TextEncoderSlot
from synthcxr.models.families.flux import FLUX
from synthcxr.models.families.pixart import PIXART
from synthcxr.models.families.sana import SANA
from synthcxr.models.families.sd import SD
from synthcxr.models.families.sd3 import SD3
from synthcxr.models.families.sdxl import SDXL

__all__ = ["FAMILIES", "Conditioning", "Family", "SampleDefaults", "TextEncoderSlot", "detect", "family_for",
           "family_of", "get_family"]

FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL, SD3, PIXART, SANA, FLUX)}

PLANNED: dict[str, str] = {"LuminaPipeline": "lumina", "Lumina2Pipeline": "lumina2"}
"""Pipelines of families that are recognised but not supported yet (a clearer error than 'unknown')."""


def supported() -> str:
    return ", ".join(f"{f.name} ({f.label})" for f in FAMILIES.values())


def get_family(name: str) -> Family:
    """The family called `name`; an unknown name fails with the supported ones listed."""
    if name in FAMILIES:
        return FAMILIES[name]
    hint = did_you_mean(name, FAMILIES, cutoff=0.5)
    raise ModelError(f"unknown model family {name!r}{hint}", fix=f"set model.family to one of: {supported()}")


def family_of(pipe: object) -> Family:
    """The family of a loaded pipeline (by its class)."""
    name = type(pipe).__name__
    for family in FAMILIES.values():
        if name == family.pipeline_class or name in family.detect_classes:
            return family
    raise ModelError(f"no model family uses the pipeline class {name}", fix=f"use a model of: {supported()}")


def detect(model_dir: str | os.PathLike) -> Family:
    """The family of a diffusers folder, from the pipeline class in its model_index.json."""
    index = Path(model_dir) / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read the pipeline class: {exc}", file=index,
                         fix="pass a complete diffusers model folder, or set model.family") from exc
    for family in FAMILIES.values():
        if class_name in family.detect_classes:
            return family
    if class_name in PLANNED:
        raise ModelError(f"{class_name} ({PLANNED[class_name]}) is not supported yet", file=index,
                         fix=f"use a model of a supported family: {supported()}")
    raise ModelError(f"unknown pipeline class {class_name!r}: no model family matches it", file=index,
                     fix=f"use a model of a supported family ({supported()}), or set model.family if this "
                     "pipeline class is a variant of one of them")


def family_for(location: str | os.PathLike | None, override: str | None = None,
               single_file_config: str | os.PathLike | None = None) -> Family:
    """The family of a model: `override` when given, else detected from its folder, the single-file
    config folder, a single file's tensor names, or a hub id's cached model_index.json; else SD 1.x/2.x."""
    if override:
        return get_family(override)
    if single_file_config is not None and Path(single_file_config).is_dir():
        return detect(single_file_config)
    if location is not None and (Path(location).expanduser() / "model_index.json").is_file():
        return detect(Path(location).expanduser())
    if location is not None and Path(location).expanduser().is_file():
        return _single_file_family(Path(location).expanduser())
    cached = _hub_cached_index(str(location)) if location is not None else None
    return detect(cached.parent) if cached is not None else SD


def _hub_cached_index(repo_id: str) -> Path | None:
    """model_index.json of a hub id in the local Hugging Face cache (no network), or None."""
    from synthcxr.models.load import HUB_ID

    if not HUB_ID.match(repo_id) or repo_id.startswith((".", "/")):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(found) if isinstance(found, str) else None


def _single_file_family(path: Path) -> Family:
    """The family of a single-file checkpoint, from its tensor names and shapes (diffusers' rules)."""
    from synthcxr.models.families.single_file import infer_single_file_type

    kind = infer_single_file_type(path)
    if kind is None:
        return SD  # not inferable here (e.g. a .ckpt): today's behaviour
    for family in FAMILIES.values():
        if kind in family.single_file_types:
            return family
    raise ModelError(f"single-file checkpoint of type {kind!r}, which no supported family covers", file=path,
                     fix=f"use a model of a supported family ({supported()}), or set model.family and "
                     "model.single_file_config")
