"""`synthcxr generate`: options -> `GenerateConfig` -> `generate_images`.

Precedence: defaults < `--config FILE` < `--set key=value` < explicit options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from synthcxr.logging_utils import get_logger

log = get_logger(__name__)


def generate(
    model: Annotated[str | None, typer.Option(help="Diffusers folder, .safetensors/.ckpt file, synthcxr run directory, or hub id.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt for every image.")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    n: Annotated[int | None, typer.Option("--n", "-n", help="Number of images (default 16; per CSV row without n/count).")] = None,
    prompts_csv: Annotated[Path | None, typer.Option(help="CSV of clinical attributes: sex, age, finding/label, optional n/count, prompt.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of image 0; image i uses seed + i (default 0).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (default 4); does not change the images.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model family's; SD 30, SDXL 30, SD3 40).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (default: the family's; SD 7.5, SDXL 5, SD3 4.5).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="ddim, dpmsolver++, euler, euler_a, pndm, unipc; flow_euler for SD3 (default: the family's).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Image size in pixels (default: the model's).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (default: fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")] = None,
    device: Annotated[str | None, typer.Option(help="auto (default), cpu, cuda, cuda:N.")] = None,
    format: Annotated[str | None, typer.Option("--format", help="png (default) or dicom (Secondary Capture).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default ./generated); re-run to resume.")] = None,
    single_file_config: Annotated[Path | None, typer.Option(help="Local diffusers folder giving a single-file checkpoint's architecture.")] = None,
    prediction_type: Annotated[str | None, typer.Option(help="Override: epsilon or v_prediction (SD 2.x 768).")] = None,
    drop_t5: Annotated[bool | None, typer.Option("--drop-t5/--keep-t5", help="SD3: leave out the T5 text encoder (default: as the run was trained).")] = None,
    vae_tiling: Annotated[bool | None, typer.Option("--vae-tiling/--no-vae-tiling", help="Tiled VAE decode: less memory at 1024 px.")] = None,
    channels_last: Annotated[bool | None, typer.Option("--channels-last/--no-channels-last", help="Channels-last memory layout (default: on for CUDA).")] = None,
    fuse_qkv: Annotated[bool | None, typer.Option("--fuse-qkv/--no-fuse-qkv", help="Fused attention q/k/v projections (default: on for CUDA).")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the UNet (default: on for CUDA).")] = None,
    decode_batch_size: Annotated[int | None, typer.Option(help="Latents per VAE decode call.")] = None,
    privacy_filter: Annotated[str | None, typer.Option(help="Discard and regenerate (next seed) images too close to the training set: "
                                                            "an `evaluate` results JSON (its memorization thresholds) or auto (calibrate; --set privacy.train=DIR).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file with any of these settings.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a setting: key=value (repeatable), e.g. captions.template=...")] = None,
    launcher: Annotated[str, typer.Option(help="local (this process; under torchrun/accelerate each rank takes its share) or slurm (--shards cluster jobs via submitit).")] = "local",
    shards: Annotated[int, typer.Option(help="Cluster jobs for --launcher slurm; each makes every shards-th batch.")] = 1,
    slurm: Annotated[list[str] | None, typer.Option("--slurm", help="submitit/SLURM parameter key=value (repeatable), e.g. slurm_partition=gpu, gpus_per_node=1.")] = None,
) -> None:
    """Generate synthetic chest X-rays (PNG with provenance, or DICOM), resumable, with a manifest."""
    from synthcxr.config import apply_overrides, build_config, read_yaml
    from synthcxr.generate.sample import MANIFEST, GenerateConfig, generate_images

    data: dict[str, Any] = read_yaml(config) if config else {}
    apply_overrides(data, set_ or [])
    explicit = {
        "model": model, "prompt": prompt, "negative_prompt": negative_prompt, "n": n, "prompts_csv": prompts_csv,
        "seed": seed, "batch_size": batch_size, "steps": steps, "guidance": guidance, "scheduler": scheduler,
        "resolution": resolution, "dtype": dtype, "device": device, "format": format, "out": out,
        "single_file_config": single_file_config, "prediction_type": prediction_type, "drop_t5": drop_t5,
        "vae_tiling": vae_tiling,
        "channels_last": channels_last, "fuse_qkv": fuse_qkv, "compile": compile, "decode_batch_size": decode_batch_size,
    }
    data.update({k: v for k, v in explicit.items() if v is not None})
    if privacy_filter is not None:
        data.setdefault("privacy", {})["filter"] = privacy_filter
    if "model" not in data:
        from synthcxr.errors import ConfigError

        raise ConfigError("no model given", fix="pass --model DIR_OR_FILE (e.g. a folder made by `synthcxr model make-tiny`)")
    if data.get("prompt") is None and data.get("prompts_csv") is None:
        from synthcxr.generate.prompts import default_prompt_for_run

        run_prompt = default_prompt_for_run(data["model"])
        if run_prompt is not None:
            log.info("no --prompt given: using the run's prompt %r", run_prompt)
            data["prompt"] = run_prompt
    source = f"{config} + options" if config else "command-line options"
    cfg = build_config(GenerateConfig, data, source)
    if launcher not in ("local", "slurm"):
        from synthcxr.errors import ConfigError, did_you_mean

        raise ConfigError(f"unknown launcher {launcher!r}{did_you_mean(launcher, ('local', 'slurm'))}", fix="use local or slurm")
    if launcher == "local" and shards != 1:
        from synthcxr.errors import ConfigError

        raise ConfigError(f"--shards {shards} needs --launcher slurm",
                          fix="add --launcher slurm; on one machine use torchrun/accelerate launch (each rank takes its share)")
    if launcher == "slurm":
        from synthcxr.generate.shard import parse_slurm, run_sharded

        run_sharded(cfg, shards, slurm=parse_slurm(slurm or []))
        out_dir = cfg.out
    else:
        out_dir = generate_images(cfg)
    typer.echo(f"images in {out_dir.resolve()} (manifest: {(out_dir / MANIFEST).resolve()})")
    if cfg.privacy.filter is not None:
        from synthcxr.generate.privacy_filter import summary_line

        typer.echo(summary_line(out_dir) or "privacy filter: no image checked")
