"""Load a model of any supported family (models/families) from a local diffusers folder, a single
checkpoint file, a hub id, or a synthcxr training run (base model + LoRA, or a fine-tuned pipeline).

Hub ids are resolved from the local Hugging Face cache first; without a cached copy and without
network we fail at once (no long retries) and say to pass a local path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthcxr.errors import ModelError
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

RUN_MODEL_FILE = "synthcxr_model.json"
"""Written by training into a run directory: {"base_model": ..., "pipeline": rel|None, "lora": rel|None, "family": name}."""

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class ModelSource:
    """What a `--model` argument points at."""

    kind: str  # "folder" | "file" | "hub" | "run"
    location: str
    base_model: str | None = None
    lora: Path | None = None
    family: str | None = None
    """A run's model family as training recorded it (None: detect from the model)."""
    drop_t5: bool = False
    """The run trained without its optional T5 encoder, so it generates without it too."""


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def resolve_source(model: str | os.PathLike) -> ModelSource:
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        run_file = path / RUN_MODEL_FILE
        if run_file.is_file():
            try:
                info = json.loads(run_file.read_text())
            except json.JSONDecodeError as exc:
                raise ModelError(f"not valid JSON: {exc}", file=run_file,
                                 fix="re-export the run's final weights (resume training)") from exc
            base = info.get("base_model")
            if base and not Path(base).expanduser().is_absolute() and (path / base).exists():
                info["base_model"] = str(path / base)  # a base model stored relative to the run
            pipeline_rel = info.get("pipeline")
            lora_rel = info.get("lora")
            if pipeline_rel:
                return ModelSource("run", str(path / pipeline_rel), base_model=info.get("base_model"),
                                   lora=path / lora_rel if lora_rel else None, family=info.get("family"),
                                   drop_t5=bool(info.get("drop_t5")))
            if not info.get("base_model"):
                raise ModelError("run has neither a pipeline nor a base model", file=run_file,
                                 fix="finish or re-run training for this run")
            return ModelSource("run", str(info["base_model"]), base_model=info["base_model"],
                               lora=path / lora_rel if lora_rel else None, family=info.get("family"),
                               drop_t5=bool(info.get("drop_t5")))
        if (path / "model_index.json").is_file():
            return ModelSource("folder", str(path))
        if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
            raise ModelError("this looks like a training run without final weights", file=path,
                             fix="let training finish (or resume it with --resume) before generating from it")
        raise ModelError("folder is not a diffusers model (no model_index.json)", file=path,
                         fix="pass a diffusers model folder, a .safetensors/.ckpt file, a synthcxr run directory, or a hub id")
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelError(f"unsupported model file type {path.suffix!r}", file=path,
                             fix=f"pass one of {', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder")
        return ModelSource("file", str(path))
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return ModelSource("hub", text)
    raise ModelError("model not found", file=text,
                     fix="pass an existing diffusers folder, a .safetensors/.ckpt file, or a hub id like org/name")


def _hub_local_or_fail(repo_id: str) -> tuple[str, bool]:
    """Return (repo_id, local_files_only); raise at once when neither cache nor network has it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True, allow_patterns=["model_index.json"])
        return repo_id, True
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if not hub_reachable():
        raise ModelError(
            f"hub id {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached",
            fix=f"download the model on a networked machine (huggingface-cli download {repo_id} --local-dir DIR) "
            "and pass --model DIR, or pass a local .safetensors/.ckpt file",
        )
    return repo_id, False


def load_pipeline(
    model: str | os.PathLike,
    *,
    torch_dtype: Any = None,
    device: str | None = None,
    prediction_type: str | None = None,
    single_file_config: str | os.PathLike | None = None,
    load_lora: bool = True,
    fuse_lora: bool = True,
    family: str | None = None,
    drop_t5: bool | None = None,
):
    """Return the model's diffusers pipeline (the class its family names; SD safety checker off).

    `family` overrides the family detected from model_index.json (or the single file's tensors).
    `drop_t5` leaves out an optional T5 encoder (None: as the run recorded it; False for other models).
    `prediction_type` overrides the scheduler's (SD 2.x 768 models use "v_prediction"; epsilon/v families only).
    `single_file_config` is a local diffusers folder giving the architecture of a single-file
    checkpoint, needed offline (diffusers otherwise fetches the config from the hub).
    A run's LoRA is loaded (`load_lora`) and merged into the weights (`fuse_lora`) for fast sampling;
    pass `fuse_lora=False` to keep it as a switchable adapter.
    """
    import torch

    from synthcxr.models.families import family_for

    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ModelError(f"unknown prediction_type {prediction_type!r}", fix="use epsilon or v_prediction")
    _quiet_loading()
    source = resolve_source(model)
    fam = family_for(source.location, family or source.family, single_file_config)
    if prediction_type is not None and fam.objective != "ddpm":
        raise ModelError(f"prediction_type {prediction_type!r} does not apply to {fam.label} (trained with flow matching)",
                         fix="leave prediction_type unset for this model")
    pipeline_cls = fam.pipeline_cls()
    kwargs: dict[str, Any] = dict(fam.pipeline_options)
    if drop_t5 if drop_t5 is not None else source.drop_t5:
        if not fam.droppable_t5():
            raise ModelError(f"{fam.label} has no T5 text encoder to drop", fix="do not ask to drop T5 for this model")
        kwargs.update({slot.encoder: None for slot in fam.droppable_t5()})  # never read from disk
    if torch_dtype is not None:
        kwargs[_dtype_kwarg()] = torch_dtype
    # a run points at its own pipeline folder or at its base model, which is itself a folder, file or hub id
    kind = resolve_source(source.location).kind if source.kind == "run" else source.kind
    try:
        if kind == "file":
            from synthcxr.models.families.single_file import check_single_file_config

            check_single_file_config(Path(source.location).expanduser(), fam, single_file_config)
            pipe = _load_single_file(pipeline_cls, source.location, single_file_config, kwargs)
        elif kind == "hub":
            repo_id, local_only = _hub_local_or_fail(source.location)
            pipe = pipeline_cls.from_pretrained(repo_id, local_files_only=local_only, **kwargs)
        else:
            pipe = pipeline_cls.from_pretrained(source.location, local_files_only=True, **kwargs)
    except ModelError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"could not load the model as {fam.label}: {exc}", file=source.location,
                         fix=f"check that the folder/file is a complete {fam.label} model (or set model.family)") from exc
    if source.lora is not None and load_lora:
        if not source.lora.exists():
            raise ModelError("LoRA weights listed by the run are missing", file=source.lora,
                             fix="re-export the run's final weights (resume training)")
        try:
            with _unet_only_lora_quiet(source.lora):
                pipe.load_lora_weights(str(source.lora.parent), weight_name=source.lora.name)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"could not apply the run's LoRA weights: {exc}", file=source.lora,
                             fix="check that the run's base_model is the model the LoRA was trained on") from exc
        if fuse_lora:
            # merge the low-rank update into the base weights: same images, no extra matmuls per step
            pipe.fuse_lora()
            pipe.unload_lora_weights()
    if prediction_type is not None:
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if torch_dtype is None and getattr(pipe, fam.denoiser).dtype != torch.float32 and (device or "cpu") == "cpu":
        pipe.to(torch.float32)
    return pipe


def _dtype_kwarg() -> str:
    """diffusers >= 0.36 names the argument `dtype` (and warns about `torch_dtype`); older ones `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _quiet_loading() -> None:
    """Our own progress bars and logs report loading; the libraries' per-component bars are noise."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """Hide diffusers'/transformers' tqdm bars (e.g. "Writing model shards") inside the block.

    Saving a model is one step that our own logs report; the libraries' per-shard bars only clutter
    the output. The previous on/off state is restored afterwards.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was_on = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in was_on:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in was_on:
            lib.enable_progress_bar()


LORA_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline", "diffusers.loaders.peft")
"""diffusers modules that report a LoRA file without keys for one of the pipeline's models."""


class _DropNoTextEncoderKeys(logging.Filter):
    """Drops diffusers' "No LoRA keys associated to CLIPTextModel ... prefix='text_encoder'" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("No LoRA keys associated to") and "text_encoder" in text)


@contextmanager
def _unet_only_lora_quiet(lora_file: Path) -> Iterator[None]:
    """Load a UNet-only LoRA without diffusers warning that the text encoder got no LoRA keys.

    Training a LoRA on the UNet alone is the default, so that warning would print on every load;
    it is dropped only when the file holds UNet keys and nothing else (then it is certainly
    harmless). Every other message, including one about missing UNet keys, still shows.
    """
    if not _only_unet_keys(lora_file):
        yield
        return
    drop = _DropNoTextEncoderKeys()
    loggers = [logging.getLogger(name) for name in LORA_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _only_unet_keys(lora_file: Path) -> bool:
    """True when a .safetensors LoRA file has only denoiser (`unet.*`/`transformer.*`) keys (read from its header)."""
    if lora_file.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(lora_file), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:  # not readable here: let diffusers load it and report any problem itself
        return False
    return bool(keys) and all(key.startswith(("unet.", "transformer.")) for key in keys)


def _load_single_file(pipeline_cls, path: str, config: str | os.PathLike | None, kwargs: dict[str, Any]):
    extra: dict[str, Any] = {}
    if config is not None:
        extra["config"] = str(config)
        extra["local_files_only"] = True
    elif not hub_reachable():
        extra["local_files_only"] = True
    try:
        return pipeline_cls.from_single_file(path, **extra, **kwargs)
    except Exception as exc:  # diffusers raises many types here; all mean "cannot infer/convert"
        raise ModelError(
            f"could not load single-file checkpoint: {exc}",
            file=path,
            fix="offline, pass --single-file-config DIR pointing at a local diffusers folder of the same "
            "architecture (e.g. an SD 1.5 or SD 2.1 folder), or convert the checkpoint to a diffusers folder",
        ) from exc
