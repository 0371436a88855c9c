"""Generate synthetic chest X-rays from a model or a training run: images + `manifest.jsonl`, resumable.

Guarantees a user relies on:
- the same seed gives the same image: image i uses its own generator seeded with `seed + i`, so
  the batch size and the resume point do not change any image;
- an interrupted run continues where it stopped: each file is written atomically and its manifest
  line appended after it, so a listed file is complete; listed files whose sha256 matches are skipped;
- nothing a user made is overwritten: a folder holding another generation's manifest, or images
  this run did not write, is refused with a clear message;
- one generation writes into a folder at a time: a second one started on the same folder fails at
  once (an flock on `OUT/.lock`, released by the kernel even when a run crashes);
- with `--privacy-filter`, an image too close to a training image is made again with the next seed
  before it is written (privacy_filter.py), keeping every guarantee above.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from synthcxr.config import StrictModel, save_config
from synthcxr.data.config import CaptionConfig
from synthcxr.errors import ConfigError
from synthcxr.generate.privacy_filter import PrivacyFilterConfig
from synthcxr.generate.schedulers import check_scheduler_name
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.jsonl"
CONFIG_FILE = "generate_config.yaml"
DTYPES = ("auto", "fp32", "fp16", "bf16")


class GenerateConfig(StrictModel):
    """Settings of one generation; saved as `generate_config.yaml` in the output folder."""

    model: str
    """Diffusers folder, single .safetensors/.ckpt file, synthcxr run directory, or hub id (cached)."""
    prompt: str | None = None
    """One prompt for all `n` images (or use prompts_csv)."""
    negative_prompt: str = ""
    n: int = Field(16, ge=0)
    """Images to generate (with prompts_csv: per row without an n/count column)."""
    prompts_csv: Path | None = None
    """CSV of clinical attributes (sex, age, finding/label, optional n/count, prompt) -> captions."""
    captions: CaptionConfig = CaptionConfig()
    """Caption template for prompts_csv; match the one the model was trained with."""
    seed: int = 0
    """Image i uses seed + i."""
    batch_size: int = Field(4, ge=1)
    steps: int | None = Field(None, ge=1)
    """Denoising steps; default: the model family's (SD 30, SDXL 30, SD3 40)."""
    guidance: float | None = Field(None, ge=0)
    """Classifier-free guidance scale (<= 1 turns guidance off); default: the family's (SD 7.5, SDXL 5, SD3 4.5)."""
    scheduler: str | None = None
    """ddim, dpmsolver++, euler, euler_a, pndm, unipc (epsilon/v families) or flow_euler (flow-matching
    families); default: the family's (SD dpmsolver++, SDXL euler, SD3 flow_euler)."""
    resolution: int | None = Field(None, ge=8)
    """Square image size in pixels; default: the model's native size."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto = fp16 on CUDA, fp32 on CPU; fp16/bf16 need a GPU."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, mps."""
    format: Literal["png", "dicom"] = "png"
    out: Path = Path("generated")
    single_file_config: Path | None = None
    """Local diffusers folder with the architecture of a single-file checkpoint (needed offline)."""
    drop_t5: bool | None = None
    vae_tiling: bool = False
    """Decode in tiles (diffusers' tiled VAE): bounded memory at 1024 px; seams are blended, pixels differ slightly."""
    """Leave out SD3's T5 text encoder (zeros in its place); default: as the run was trained, else keep it."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the model's prediction type (SD 2.x 768 models use v_prediction)."""
    channels_last: bool | None = None
    """Channels-last UNet/VAE memory layout; default: on for CUDA."""
    fuse_qkv: bool | None = None
    """Fuse the attention q/k/v projections into one matmul; default: on for CUDA."""
    compile: bool | None = None
    """torch.compile the UNet (slow first batch, faster after); default: on for CUDA."""
    decode_batch_size: int | None = Field(None, ge=1)
    """Latents decoded per VAE call; default: the whole batch (CPU) or min(batch, 8) (CUDA)."""
    privacy: PrivacyFilterConfig = Field(default_factory=PrivacyFilterConfig)
    """--privacy-filter eval.json|auto: discard and regenerate images too close to the training set (privacy_filter.py)."""

    @field_validator("model", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        return None if value is None else check_scheduler_name(value)

    @model_validator(mode="after")
    def _one_prompt_source(self) -> GenerateConfig:
        if self.prompts_csv is None and self.prompt is None:
            raise ValueError("give a prompt (--prompt) or a prompts_csv (--prompts-csv)")
        if self.prompts_csv is not None and self.prompt is not None:
            raise ValueError("give either prompt or prompts_csv, not both")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 8")
        return self


# --------------------------------------------------------------------------- runtime choices
def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but no CUDA GPU is available", fix="use --device cpu (or auto)")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    on_gpu = device.startswith("cuda")
    if name == "auto":
        return torch.float16 if on_gpu else torch.float32
    if name in ("fp16", "bf16") and not on_gpu:
        raise ConfigError(f"dtype {name} needs a CUDA GPU; this run is on {device!r}",
                          fix="use --dtype fp32 (or auto) on the CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def model_id(model: str) -> str:
    """The model as recorded in manifests: an absolute path for local models, else the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def with_family_defaults(cfg: GenerateConfig, family: Any) -> GenerateConfig:
    """Fill unset sampling settings from the family; refuse a sampler or resolution the family cannot use."""
    defaults = family.sample
    update = {k: v for k, v in (("steps", defaults.steps), ("guidance", defaults.guidance),
                                ("scheduler", defaults.scheduler)) if getattr(cfg, k) is None}
    cfg = cfg.model_copy(update=update)
    if cfg.scheduler not in family.schedulers:
        raise ConfigError(f"scheduler {cfg.scheduler!r} does not fit {family.label} ({family.objective} objective)",
                          fix=f"use one of: {', '.join(family.schedulers)}")
    return cfg


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- main entry
def generate_images(
    cfg: GenerateConfig,
    *,
    pipe: Any = None,
    on_image: Callable[[dict[str, Any]], None] | None = None,
    shard: Any = None,
) -> Path:
    """Generate every image of `cfg` not yet in `cfg.out`; return the output folder.

    `pipe` reuses an already loaded pipeline (its scheduler is replaced); `on_image(row)` is called
    after each image's file and manifest line are on disk (progress hooks, tests). `shard`: this process's
    part of a multi-process generation (default: from torchrun/accelerate's RANK/WORLD_SIZE; see shard.py).
    """
    from synthcxr.generate.export import EXPORTERS
    from synthcxr.generate.privacy_filter import plan_filter, prepare_filter
    from synthcxr.generate.prompts import plan_jobs
    from synthcxr.generate.shard import Shard, hold_output

    # 1. check inputs and choose device/precision before any heavy work
    shard = shard or Shard.from_env()
    device = resolve_device(shard.device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    jobs = plan_jobs(cfg)
    exporter = EXPORTERS[cfg.format]
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("output path exists and is a file", file=out, fix="pass a folder for --out")
    privacy_plan = plan_filter(cfg.privacy, cfg.model)  # a bad evaluation JSON stops here, before any work

    # one writer per folder: a second generate into it fails here, before loading a model
    with hold_output(out, shard):
        screen = prepare_filter(privacy_plan, cfg.privacy, out, device=device) if privacy_plan else None
        done = _generate(cfg, pipe, on_image, out=out, device=device, dtype=dtype, jobs=jobs, exporter=exporter,
                         shard=shard, screen=screen)
    if screen is not None:
        screen.raise_if_left_out(out)
    return done


def _generate(cfg: GenerateConfig, pipe: Any, on_image: Callable[[dict[str, Any]], None] | None, *, out: Path,
              device: str, dtype: Any, jobs: list[Any], exporter: Any, shard: Any, screen: Any = None) -> Path:
    """The body of `generate_images`, run while holding the output folder's lock. `screen`: the privacy filter."""
    import torch

    from synthcxr.generate.export import Provenance, provenance_time
    from synthcxr.generate.manifest import plan_rows
    from synthcxr.generate.schedulers import make_scheduler
    from synthcxr.logging_utils import progress_bar
    from synthcxr.models.families import family_of
    from synthcxr.models.load import load_pipeline

    on_gpu = device.startswith("cuda")
    # 2. load the model (unless given), fill the family's sampling defaults and set the sampler
    if pipe is None:
        pipe = load_pipeline(cfg.model, torch_dtype=dtype, device=device, prediction_type=cfg.prediction_type,
                             single_file_config=cfg.single_file_config, drop_t5=cfg.drop_t5)
    family = family_of(pipe)
    cfg = with_family_defaults(cfg, family)
    # build every sampler from the model's own scheduler config, not from a sampler set by an earlier call
    base_scheduler = getattr(pipe, "_synthcxr_model_scheduler", None) or pipe.scheduler.config
    pipe._synthcxr_model_scheduler = base_scheduler
    pipe.scheduler = make_scheduler(cfg.scheduler, base_scheduler)
    if cfg.prediction_type is not None:
        pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)
    resolution = cfg.resolution or family.native_resolution(pipe)
    multiple = family.resolution_multiple(pipe.vae, getattr(pipe, family.denoiser))
    if resolution % multiple:
        raise ConfigError(f"resolution {resolution} is not a multiple of {multiple} ({family.label}: VAE factor x patch size)",
                          fix=f"use a multiple of {multiple}, e.g. {max(multiple, resolution // multiple * multiple)}")

    # 3. what is already done in `out`, and is it from the same settings?
    model_name = model_id(cfg.model)
    rows = plan_rows(jobs, model=model_name, scheduler=cfg.scheduler, steps=cfg.steps, guidance=cfg.guidance,
                     resolution=resolution, dtype=_dtype_name(dtype), suffix=exporter.suffix,
                     prediction_type=pipe.scheduler.config.get("prediction_type", family.objective))
    if screen is not None:  # a resume must use the same filter (thresholds, extractor, training set)
        for row in rows.values():
            row["privacy_filter"] = screen.fingerprint
    if cfg.vae_tiling:  # tiles decoded apart and blended give other pixels: a resume must tile alike
        for row in rows.values():  # (recorded only when on, so folders from before the key still resume)
            row["vae_tiling"] = True
    from synthcxr.generate.shard import open_manifest

    state = open_manifest(out, rows, shard)
    pending = [job for job in jobs if job.index not in state.done]
    if shard.rank == 0:
        save_config(cfg, out / CONFIG_FILE)
    if not pending:
        log.info("all %d images already in %s", len(jobs), out)
        return out

    # 4. speed options: on by default on CUDA only (they cost time or do nothing on a CPU)
    _apply_speed_options(pipe, cfg, on_gpu, getattr(pipe, family.denoiser))
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    elif getattr(pipe.vae, "use_tiling", False):  # a reused pipeline tiled for an earlier call
        pipe.vae.disable_tiling()
    decode_batch = cfg.decode_batch_size or (min(cfg.batch_size, 8) if on_gpu else cfg.batch_size)
    do_cfg = cfg.guidance > 1
    embeds: dict[tuple[str, str], dict[str, Any]] = {}

    def encode(prompt: str, negative: str) -> dict[str, Any]:
        """Prompt embeddings, computed once per distinct prompt (the text encoders are not re-run per batch)."""
        key = (prompt, negative)
        if key not in embeds:
            embeds[key] = family.prompt_kwargs(pipe, prompt, negative, device, do_cfg)
        return embeds[key]

    series_key = state.series_key

    def sample(batch: list[Any], seeds: list[int]) -> list[Any]:
        """Denoise and decode: one CPU generator per image, so an image's noise depends on its seed only."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        latents = pipe(
            **_stack([encode(job.prompt, job.negative_prompt) for job in batch]),
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            height=resolution,
            width=resolution,
            generator=generators,
            output_type="latent",
            return_dict=False,
        )[0]
        # decode in chunks (bounds VAE memory at high resolution)
        return _decode(pipe, family, latents, decode_batch)

    log.info("generating %d of %d images into %s (%s, %d steps, %s, %s)", len(pending), len(jobs), out,
             cfg.scheduler, cfg.steps, device, _dtype_name(dtype))
    with progress_bar(len(jobs), "generating", completed=len(jobs) - len(pending)) as (progress, task), \
            torch.inference_mode():
        for batch, todo in shard.batches(_aligned_batches(jobs, pending, cfg.batch_size), cfg.batch_size):
            # 5. denoise and decode: image i's noise depends on seed + i only
            images = sample(batch, [job.seed for job in batch])
            # 6. write each image (with the privacy filter: once it passes, see privacy_filter.py)
            for job, image in zip(batch, images, strict=True):
                if job.index not in todo:
                    continue  # finished before an interruption; recomputed only to keep batches aligned
                prov = Provenance(model=model_name, prompt=job.prompt, negative_prompt=job.negative_prompt,
                                  seed=job.seed, scheduler=cfg.scheduler, steps=cfg.steps, guidance=cfg.guidance,
                                  created=provenance_time(), extra=job.attributes)
                data, extra = exporter.encode(image, prov, series_key, job.index + 1), None
                if screen is not None:
                    data, extra = screen.screen(job.index, job.seed, data, lambda seed, job=job, prov=prov: exporter.encode(
                        sample([job], [seed])[0], replace(prov, seed=seed), series_key, job.index + 1))
                    if data is None:
                        continue  # every candidate rejected: left out, named when the run ends
                row = state.write(job.index, data, created=prov.created.isoformat(), extra=extra)
                if on_image is not None:
                    on_image(row)
            progress.advance(task, len(todo))  # once per batch, so the rate (and ETA) is per batch time
    log.info("%d images in %s (manifest %s)", len(jobs), out, out / MANIFEST)
    return out


def _stack(kwargs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-prompt pipeline arguments -> one batch: tensors concatenated, None and plain values kept."""
    import torch

    out: dict[str, Any] = {}
    for key, first in kwargs[0].items():
        out[key] = torch.cat([k[key] for k in kwargs]) if isinstance(first, torch.Tensor) else first
    return out


def _apply_speed_options(pipe: Any, cfg: GenerateConfig, on_gpu: bool, denoiser: Any) -> None:
    """Fused QKV projections, channels-last layout, compiled denoiser; each applied once per pipeline."""
    import torch

    done: set[str] = getattr(pipe, "_synthcxr_speed", set())
    pipe._synthcxr_speed = done
    wanted = {name for name, value in (("fuse_qkv", cfg.fuse_qkv), ("channels_last", cfg.channels_last),
                                        ("compile", cfg.compile)) if (on_gpu if value is None else value)}
    if "fuse_qkv" in wanted - done:
        try:
            pipe.fuse_qkv_projections()
        except (AttributeError, ValueError) as exc:  # attention processors that cannot be fused
            log.warning("fused QKV projections not available for this model: %s", exc)
    if "channels_last" in wanted - done:
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if "compile" in wanted - done:
        log.info("compiling the denoiser (the first batch is slow, the next ones faster)")
        denoiser.compile()
    done |= wanted


def _aligned_batches(jobs: list[Any], pending: list[Any], batch_size: int) -> list[tuple[list[Any], set[int]]]:
    """Batches of images [k*batch_size, (k+1)*batch_size) that still hold unfinished images.

    Floating-point results of a batched UNet/VAE depend (by ~1e-6) on which images share a batch,
    so a resumed run recomputes the same batches as an uninterrupted one (only unfinished images
    are written): the same seed and batch size then give identical bytes whatever the resume point.
    """
    todo = {job.index for job in pending}
    batches = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        want = {job.index for job in batch} & todo
        if want:
            batches.append((batch, want))
    return batches


def _decode(pipe: Any, family: Any, latents: Any, chunk: int) -> list[Any]:
    """Latents -> PIL images, `chunk` latents per VAE call."""
    import torch

    images = []
    for i in range(0, latents.shape[0], chunk):
        images.append(family.decode(pipe.vae, latents[i:i + chunk]))
    decoded = torch.cat(images)
    return pipe.image_processor.postprocess(decoded, output_type="pil")


def output_files(out: str | os.PathLike) -> list[Path]:
    """The image files listed in an output folder's manifest, in index order."""
    from synthcxr.fileio import read_jsonl

    out = Path(out)
    rows = sorted(read_jsonl(out / MANIFEST), key=lambda r: r.get("index", 0))
    return [out / r["file"] for r in rows]
