"""`synthcxr demo`: the whole study, tiny, on a CPU, in a couple of minutes.

It builds a tiny random Stable Diffusion model and a small chest X-ray data set (or uses `--data`,
e.g. the real Shenzhen/Montgomery sample), then runs a two-run grid — LoRA + AdamW and
DreamBooth + Prodigy, a few steps at 64 px — through generation, evaluation and a reader study
answered by simulated readers, and writes the HTML report. The grid it runs is saved as
`OUT/demo_grid.yaml`, a starting point for a real grid. Re-running reuses every finished step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_OUT = Path("synthcxr-demo")
PROMPTS_CSV = "label,sex,age,n\ntuberculosis,male,45,2\ntuberculosis,female,38,2\nnormal,male,52,2\nnormal,female,29,2\n"
"""Conditioned prompts for generation: both labels and sexes, so utility and conditioning checks have data."""


def demo_grid(model: Path, data: Path, prompts_csv: Path, steps: int, extractor: str) -> dict[str, Any]:
    """The demo's grid file as a dict: the study's shape, sized for a CPU."""
    return {
        "name": "demo",
        "base": {
            "model": {"path": str(model)},
            "data": {"path": str(data), "resolution": 64, "split": {"val": 0.2, "test": 0.0, "seed": 0}},
            "method": {"name": "lora", "rank": 4},
            "optimizer": {"name": "adamw", "lr": 1e-3},
            "train": {
                "max_steps": steps, "batch_size": 2, "seed": 0, "log_every": 1, "checkpoint_every": steps,
                "keep_checkpoints": 1, "validate_every": max(1, steps // 2), "validation_steps": 2,
                "validation_seeds": [0], "max_validation_images": 4, "validation_timesteps": [200, 600],
                "cache_latents": "ram",
            },
        },
        "axes": {
            "method": {"lora": {}, "dreambooth": {"optimizer.lr": 5e-6}},
            "optimizer": {"adamw": {}, "prodigy": {"optimizer.lr": 1.0, "optimizer.weight_decay": 0.0}},
        },
        "exclude": [{"method": "lora", "optimizer": "prodigy"}, {"method": "dreambooth", "optimizer": "adamw"}],
        "generate": {"prompts_csv": str(prompts_csv), "seed": 100, "steps": 4, "guidance": 1.0, "scheduler": "ddim",
                     "batch_size": 8, "device": "cpu"},
        "evaluate": {
            "real": str(data),
            "metrics": ["fidelity", "diversity", "memorization", "utility"],
            "extractor": {"name": extractor, "device": "cpu", "batch_size": 16},
            "fidelity": {"bootstrap": 50, "kid_subsets": 20},
            "diversity": {"image_size": 64, "pairs": 20},
            "memorization": {"ssim_size": 64, "top_pairs": 4},
            "utility": {"image_size": 32, "epochs": 1, "n_boot": 50, "sex": False},
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


def _prepare_model(out: Path) -> Path:
    model = out / "model"
    if not (model / "model_index.json").is_file():
        from synthcxr.models.tiny import make_tiny_model

        make_tiny_model(model, sample_size=64)
    return model.resolve()


def run_demo(out: Path = DEFAULT_OUT, data: Path | None = None, *, steps: int = 4, extractor: str = "random") -> tuple[Path, Any]:
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
    # 1. a tiny model and a small data set (both reused when present)
    model = _prepare_model(out)
    data_root = _prepare_data(out, data)
    prompts = out / "prompts.csv"
    if not prompts.is_file():
        atomic_write_text(prompts, PROMPTS_CSV)
    # 2. the grid file (kept so users can edit and run it with `synthcxr grid`)
    grid_file = out / "demo_grid.yaml"
    grid = demo_grid(model, data_root, prompts.resolve(), steps, extractor)
    atomic_write_text(grid_file, "# written by `synthcxr demo`; run it again with:\n"
                      f"#   synthcxr grid {grid_file} --out {out / 'grid'}\n" + yaml.safe_dump(grid, sort_keys=False))
    # 3. train -> generate -> evaluate per run, then the simulated reader study
    plan = load_plan(grid_file)
    result = run_grid(plan, out / "grid")
    # 4. the report
    report = build_report(out / "grid")
    log.info("demo finished: %s", result.describe())
    return report, result


def demo(
    data: Annotated[Path | None, typer.Option("--data", help="Folder with real chest X-rays (e.g. holding ChinaSet_AllFiles/MontgomerySet); default: generated sample data.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; re-running reuses finished steps.")] = DEFAULT_OUT,
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = 4,
    inception: Annotated[bool, typer.Option("--inception/--random-features", help="Use the standard Inception FID network (slower) instead of a random-init feature extractor.")] = False,
) -> None:
    """Tiny model + sample data -> two-run grid -> generation -> evaluation -> simulated reader study -> report."""
    started = time.perf_counter()
    report, result = run_demo(out, data, steps=steps, extractor="inception" if inception else "random")
    typer.echo(result.describe(), err=True)
    typer.echo(f"demo took {time.perf_counter() - started:.0f} s; open the report: {report}", err=True)
    typer.echo(str(report))
    if not result.ok:
        raise typer.Exit(1)
