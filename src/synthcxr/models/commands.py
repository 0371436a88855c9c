"""`synthcxr model ...` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("make-tiny")
def make_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline to.")],
    resolution: Annotated[int, typer.Option(help="Pixel resolution the tiny model is built for.")] = 64,
    prediction_type: Annotated[str | None, typer.Option(help="--family sd only: epsilon (default; SD 1.x / SD 2.x base) or v_prediction (SD 2.x 768).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    family: Annotated[str, typer.Option(help="Model family: sd (1.x/2.x), sdxl or sd3.")] = "sd",
    train_vae: Annotated[Path | None, typer.Option("--train-vae", metavar="DATA", help="Fit the VAE to this chest X-ray folder (any layout `data inspect` reads) so its decoder renders X-rays instead of noise; the denoiser stays random.")] = None,
    vae_steps: Annotated[int, typer.Option(help="--train-vae: optimisation steps (about 20 s per 300 on 2 CPU cores at 64 px).")] = 300,
) -> None:
    """Build a tiny random-initialised pipeline of a model family (real classes, tiny sizes, local tokenizers), offline.

    With --train-vae DATA its VAE is then fitted to DATA (seeded, in well under a minute on a CPU), the
    base model `synthcxr demo` fine-tunes.
    """
    from synthcxr.errors import ConfigError
    from synthcxr.models.families import get_family

    fam = get_family(family)
    options = {}
    if prediction_type is not None:
        if fam.objective != "ddpm" or fam.name != "sd":
            raise ConfigError(f"--prediction-type applies to --family sd only, not {fam.name}",
                              fix="leave --prediction-type out")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"unknown --prediction-type {prediction_type!r}", fix="use epsilon or v_prediction")
        options["prediction_type"] = prediction_type
    if resolution % 8 or resolution < 16:
        raise ConfigError(f"--resolution {resolution} must be a multiple of 8 and at least 16")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError("output folder exists and is not empty", file=out_dir,
                          fix="choose a new folder; nothing was overwritten")
    pixels = None
    if train_vae is not None:  # read the data before writing anything, so bad data leaves no half-made model
        from synthcxr.models.tiny_vae import load_pixels

        if vae_steps < 1:
            raise ConfigError(f"--vae-steps {vae_steps} must be at least 1")
        pixels = load_pixels(train_vae, resolution)
    fam.write_tiny(out_dir, resolution=resolution, seed=seed, **options)
    if train_vae is not None:
        from synthcxr.models.tiny_vae import VaeFit, fit_saved_vae

        fit_saved_vae(out_dir, train_vae, VaeFit(steps=vae_steps, seed=seed), pixels=pixels)
    typer.echo(str(out_dir))
