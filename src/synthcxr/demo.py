"""`synthcxr demo`: a model learning chest X-rays, the whole study, tiny, on a CPU, in minutes.

It makes a small chest X-ray data set (or uses `--data`, e.g. the real Shenzhen/Montgomery
sample) and a tiny Stable Diffusion model whose autoencoder is fitted to that data (a random one
decodes everything to noise, so nothing learnt would show) while its denoiser stays random. Then a
grid — the base model as it is (`baseline`) and a full fine-tune of its denoiser (AdamW, a few
hundred steps of 8 images at 64 px; a random denoiser has nothing for LoRA to adapt) — goes through
generation (same prompts and seeds for every run), evaluation (Inception KID/FID against the data)
and a reader study answered by simulated readers, and the HTML report shows the fine-tuned samples
beside the base model's with the KID change. The grid is saved as `OUT/demo_grid.yaml`, a starting
point for a real grid (add methods and optimizers to its axes). Re-running reuses every finished step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_OUT = Path("synthcxr-demo")
DEFAULT_STEPS = 400
"""Training steps (batches of 8): the random denoiser learns the anatomy at 64 px, and validation loss still falls;
on ~10 real images more steps give sharper samples but start memorising them (BENCHMARKS.md)."""
DEFAULT_VAE_STEPS = 300
PROMPTS_CSV = "label,sex,age,n\ntuberculosis,male,45,2\ntuberculosis,female,38,2\nnormal,male,52,2\nnormal,female,29,2\n"
"""Conditioned prompts for generation: both labels and sexes, so utility and conditioning checks have data."""


UTILITY_MIN_PER_LABEL = 10
"""Images of each label the data needs for the utility metric: a 20% test split then holds >= 2 of each."""


def demo_metrics(data: Path) -> list[str]:
    """The evaluation metrics the data supports: utility (a classifier tested on real images) needs
    enough labelled test images; on a small set (e.g. 12 real images: 1 + 1 in the test split) it is
    left out, with a note, rather than failing every run."""
    from collections import Counter

    from synthcxr.data.config import DataConfig
    from synthcxr.data.dataset import load_records
    from synthcxr.logging_utils import get_logger

    counts = Counter(r.label for r in load_records(DataConfig(path=Path(data), resolution=64)))
    fewest = min((counts.get(label, 0) for label in ("normal", "tuberculosis")), default=0)
    if fewest >= UTILITY_MIN_PER_LABEL:
        return ["fidelity", "diversity", "memorization", "utility"]
    get_logger(__name__).info("utility left out: the data has %s; it needs >= %d images of each label",
                              dict(counts), UTILITY_MIN_PER_LABEL)
    return ["fidelity", "diversity", "memorization"]


def demo_grid(model: Path, data: Path, prompts_csv: Path, steps: int, extractor: str,
              metrics: list[str] | None = None) -> dict[str, Any]:
    """The demo's grid file as a dict: the study's shape, sized for a CPU."""
    return {
        "name": "demo",
        "base": {
            "model": {"path": str(model)},
            "data": {"path": str(data), "resolution": 64, "split": {"val": 0.2, "test": 0.2, "seed": 0}},
            # the denoiser starts random: train all of it, at a rate a small network takes from scratch
            "method": {"name": "full"},
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "schedule": {"name": "cosine", "warmup_steps": max(1, steps // 20)},
            "train": {
                "max_steps": steps, "batch_size": 8, "seed": 0, "log_every": 1, "checkpoint_every": steps,
                "keep_checkpoints": 1, "validate_every": max(1, steps // 4), "validation_steps": 10,
                "validation_guidance": 1.0, "validation_seeds": [0], "max_validation_images": 4,
                "validation_timesteps": [200, 600], "cache_latents": "ram",
            },
        },
        "axes": {"method": {"full": {}}, "optimizer": {"adamw": {}}},
        "baseline": True,
        # an unguided 10-step DDIM from the last timestep (the model's trailing spacing): guidance needs
        # an unconditional branch the short fine-tune has not learnt apart from the conditional one
        "generate": {"prompts_csv": str(prompts_csv), "seed": 100, "steps": 10, "guidance": 1.0, "scheduler": "ddim",
                     "batch_size": 8, "device": "cpu"},
        "evaluate": {
            "real": str(data),
            "metrics": metrics or ["fidelity", "diversity", "memorization", "utility"],
            "extractor": {"name": extractor, "device": "cpu", "batch_size": 16},
            "fidelity": {"ci_groups": 50, "kid_subsets": 20},
            "diversity": {"image_size": 64, "pairs": 20},
            "memorization": {"image_size": 64, "top_pairs": 4},
            "utility": {"image_size": 32, "epochs": 1, "seeds": 2, "n_boot": 50, "sex": False},
        },
        "study": {"per_model": 4, "real_count": 4, "readers": 2, "simulate": True},
    }


def _prepare_data(out: Path, data: Path | None) -> Path:
    """`--data` as given, or generated Shenzhen + Montgomery fixtures (read together from one folder)."""
    from synthcxr.errors import DataError

    if data is not None:
        if not Path(data).exists():
            raise DataError("demo data folder not found", file=data,
                            fix="pass a folder holding ChinaSet_AllFiles and/or MontgomerySet, or leave --data out")
        return Path(data).resolve()
    root = out / "data"
    if not (root / "ChinaSet_AllFiles").is_dir() or not (root / "MontgomerySet").is_dir():
        from synthcxr.data.fixtures import make_fixture_dataset

        make_fixture_dataset(root, layout="shenzhen", n=10, size=64, seed=0)
        make_fixture_dataset(root, layout="montgomery", n=10, size=64, seed=1)
    return root.resolve()


def _prepare_model(out: Path, data: Path, vae_steps: int) -> Path:
    """The tiny model, its VAE fitted to `data` (reused when it was fitted to the same data)."""
    import json

    from synthcxr.errors import ConfigError

    model = out / "model"
    info = model / "synthcxr_tiny.json"
    if (model / "model_index.json").is_file() and info.is_file():
        fitted_on = (json.loads(info.read_text()).get("vae") or {}).get("data")
        if fitted_on != str(data):
            raise ConfigError(f"this demo folder's model was made for other data ({fitted_on or 'a random VAE'})",
                              file=model, fix="pass a new --out for this data (the existing demo is kept)")
        return model.resolve()
    from synthcxr.models.tiny import make_tiny_model
    from synthcxr.models.tiny_vae import VaeFit

    make_tiny_model(model, sample_size=64, vae_data=data, vae_fit=VaeFit(steps=vae_steps), denoiser="demo")
    return model.resolve()


def run_demo(out: Path = DEFAULT_OUT, data: Path | None = None, *, steps: int = DEFAULT_STEPS,
             extractor: str = "inception", vae_steps: int = DEFAULT_VAE_STEPS) -> tuple[Path, Any]:
    """Run the demo into `out`; returns (report path, grid result)."""
    import yaml

    from synthcxr.fileio import atomic_write_text
    from synthcxr.grid.expand import load_plan
    from synthcxr.grid.run import run_grid
    from synthcxr.logging_utils import get_logger
    from synthcxr.report.build import build_report

    log = get_logger(__name__)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. a small data set and a tiny model whose VAE is fitted to it (both reused when present)
    data_root = _prepare_data(out, data)
    model = _prepare_model(out, data_root, vae_steps)
    prompts = out / "prompts.csv"
    if not prompts.is_file():
        atomic_write_text(prompts, PROMPTS_CSV)
    # 2. the grid file (kept so users can edit and run it with `synthcxr grid`)
    grid_file = out / "demo_grid.yaml"
    grid = demo_grid(model, data_root, prompts.resolve(), steps, extractor, demo_metrics(data_root))
    atomic_write_text(grid_file, "# written by `synthcxr demo`; run it again with:\n"
                      f"#   synthcxr grid {grid_file} --out {out / 'grid'}\n" + yaml.safe_dump(grid, sort_keys=False))
    # 3. train -> generate -> evaluate per run, then the simulated reader study
    plan = load_plan(grid_file)
    result = run_grid(plan, out / "grid")
    # 4. the report
    report = build_report(out / "grid")
    log.info("demo finished: %s", result.describe())
    return report, result


def fine_tune_changes(out: Path) -> list[str]:
    """'run: KID a -> b (-x% vs the base model)' per fine-tuned run, as the report's summary states it."""
    from synthcxr.report.build import baseline_changes
    from synthcxr.report.collect import load_report_data

    return [f"{c['run']}: {c['text']}" for c in baseline_changes(load_report_data(Path(out) / "grid"), ("kid",))]


def demo(
    data: Annotated[Path | None, typer.Option("--data", help="Folder with real chest X-rays (e.g. holding ChinaSet_AllFiles/MontgomerySet); default: generated sample data.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; re-running reuses finished steps.")] = DEFAULT_OUT,
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = DEFAULT_STEPS,
    inception: Annotated[bool, typer.Option("--inception/--random-features", help="Score with the standard Inception FID network (default), or a random-init feature extractor (faster; numbers mean little).")] = True,
    vae_steps: Annotated[int, typer.Option(help="Steps fitting the tiny model's autoencoder to the data (once; reused on re-runs).")] = DEFAULT_VAE_STEPS,
) -> None:
    """Tiny model + sample data -> base model vs a fine-tune -> generation -> evaluation -> simulated reader study -> report."""
    started = time.perf_counter()
    report, result = run_demo(out, data, steps=steps, extractor="inception" if inception else "random",
                              vae_steps=vae_steps)
    typer.echo(result.describe(), err=True)
    for line in fine_tune_changes(out):
        typer.echo(f"fine-tuned vs base model, {line}", err=True)
    typer.echo(f"demo took {time.perf_counter() - started:.0f} s; open the report: {report}", err=True)
    typer.echo(str(report))
    if not result.ok:
        raise typer.Exit(1)
