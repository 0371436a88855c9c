"""`synthcxr data ...`: inspect, split, caption and make example data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from synthcxr.data.config import DataConfig

app = typer.Typer(no_args_is_help=True)

PathsArg = Annotated[list[Path] | None, typer.Argument(help="Data set folder(s); a dataset root or its parent. "
                                                             "Defaults to data.path of --config.", show_default=False)]
FormatOpt = Annotated[str | None, typer.Option("--format", "-f", help="auto, montgomery, shenzhen, folder, dicom, nih, chexpert or mimic.")]
ManifestOpt = Annotated[Path | None, typer.Option("--manifest", help="CSV/JSONL with file, caption, label, patient_id, sex, age, finding.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML with the data settings (a data config, or a config with a `data:` section).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a data setting, e.g. --set resolution=256 (repeatable).")]
OnErrorOpt = Annotated[str | None, typer.Option("--on-error", help="fail (list all problems and stop) or skip (leave bad files out).")]


def _stdout_console():  # noqa: ANN202
    from rich.console import Console

    return Console(highlight=False)


def data_config(paths: list[Path] | None = None, config: Path | None = None, sets: list[str] | None = None,
                **updates: Any) -> DataConfig:
    """DataConfig from an optional YAML (`data:` section or top level), `--set` overrides and CLI options."""
    from synthcxr.config import apply_overrides, build_config, read_yaml

    data: dict[str, Any] = read_yaml(config) if config else {}
    if isinstance(data.get("data"), dict):
        data = data["data"]
    data = apply_overrides(data, sets or [])
    if paths:
        data["path"] = [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
    data.update({k: (str(v) if isinstance(v, Path) else v) for k, v in updates.items() if v is not None})
    if "path" not in data:
        from synthcxr.errors import ConfigError

        raise ConfigError("no data path given", fix="pass the data folder as PATH, or set data.path in --config")
    return build_config(DataConfig, data, str(config) if config else "command line")


@app.command("inspect")
def inspect_command(
    paths: PathsArg = None,
    format: FormatOpt = None,
    manifest: ManifestOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report (counts + problems) as JSON here.")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Count images by sex, age band, finding, label and source, and list EVERY problem with its fix.

    Exits with status 1 when any problem is found (use it as a check before training).
    """
    from synthcxr.data.inspect import inspect_data, render_report
    from synthcxr.fileio import atomic_write_json

    cfg = data_config(paths, config, sets, format=format, manifest=manifest)
    report = inspect_data(cfg.paths, cfg.format, cfg.manifest, frontal_only=cfg.frontal_only)
    render_report(report, _stdout_console())
    if json_out is not None:
        atomic_write_json(json_out, report.to_dict())
    if report.problems:
        raise typer.Exit(1)


@app.command("split")
def split_command(
    paths: PathsArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Split file to write (.json or .csv); reused if it exists.")] = Path("split.json"),
    val: Annotated[float | None, typer.Option(help="Fraction of patients for validation.")] = None,
    test: Annotated[float | None, typer.Option(help="Fraction of patients for testing.")] = None,
    seed: Annotated[int | None, typer.Option(help="Shuffle seed (same seed -> same split).")] = None,
    format: FormatOpt = None,
    manifest: ManifestOpt = None,
    on_error: OnErrorOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Patient-level, label-stratified, seeded train/val/test split, saved to --out."""
    from collections import Counter

    from rich.table import Table

    from synthcxr.data.dataset import load_records
    from synthcxr.data.splits import SPLITS, split_records

    split_sets = [f"split.{k}={v}" for k, v in (("val", val), ("test", test), ("seed", seed)) if v is not None]
    cfg = data_config(paths, config, [*(sets or []), *split_sets], format=format, manifest=manifest, on_error=on_error)
    records = load_records(cfg)
    groups = split_records(records, cfg.split, out)
    labels = sorted({r.label or "unknown" for r in records})
    table = Table(title=f"split saved in {out}", title_justify="left")
    for column in ["split", "patients", "images", *labels]:
        table.add_column(column, justify="left" if column == "split" else "right")
    for name in SPLITS:
        recs = groups[name]
        by_label = Counter(r.label or "unknown" for r in recs)
        table.add_row(name, str(len({(r.source, r.patient_id) for r in recs})), str(len(recs)),
                      *(str(by_label[label]) for label in labels))
    _stdout_console().print(table)


@app.command("captions")
def captions_command(
    paths: PathsArg = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write {file, caption} lines to this JSONL file.")] = None,
    template: Annotated[str | None, typer.Option(help="Caption template, e.g. 'a {class_noun} of a {age_phrase} {sex}'.")] = None,
    instance: Annotated[bool, typer.Option("--instance/--no-instance", help="Put the DreamBooth rare token in the captions.")] = False,
    limit: Annotated[int, typer.Option(help="Rows to show on screen.")] = 20,
    format: FormatOpt = None,
    manifest: ManifestOpt = None,
    on_error: OnErrorOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Show (and optionally save) the caption of every image, plus the DreamBooth prompts."""
    import json

    from rich.table import Table

    from synthcxr.data.captions import class_prompt, instance_prompt
    from synthcxr.data.dataset import load_records
    from synthcxr.data.splits import record_id
    from synthcxr.fileio import atomic_write_text

    extra = [f"captions.template={json.dumps(template)}"] if template else []
    if instance:
        extra.append("captions.use_instance_prompt=true")
    cfg = data_config(paths, config, [*(sets or []), *extra], format=format, manifest=manifest, on_error=on_error)
    records = load_records(cfg)
    console = _stdout_console()
    console.print(f"instance prompt: [bold]{instance_prompt(cfg.captions)}[/bold]   "
                  f"class prompt: [bold]{class_prompt(cfg.captions)}[/bold]")
    table = Table(show_edge=False)
    table.add_column("image", overflow="fold")
    table.add_column("caption", overflow="fold")
    for record in records[:limit]:
        table.add_row(record_id(record), record.caption or "")
    console.print(table)
    if len(records) > limit:
        console.print(f"... and {len(records) - limit} more")
    if out is not None:
        lines = [json.dumps({"file": str(r.image_path), "id": record_id(r), "caption": r.caption}) for r in records]
        atomic_write_text(out, "\n".join(lines) + "\n")
        console.print(f"wrote {len(records)} captions to {out}")


@app.command("make-fixture")
def make_fixture_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the synthetic data set into.")],
    layout: Annotated[str, typer.Option(help="shenzhen, montgomery, folder, dicom, nih, chexpert or mimic.")] = "shenzhen",
    n: Annotated[int, typer.Option(help="Number of images.")] = 8,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    per_patient: Annotated[int, typer.Option(min=1, help="nih/chexpert/mimic: images per patient (one anatomy each).")] = 3,
) -> None:
    """Write a small synthetic chest-X-ray-like data set in a native layout (for trying the tools; not real data)."""
    from synthcxr.data.fixtures import LAYOUTS, make_fixture_dataset
    from synthcxr.errors import ConfigError

    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}", fix=f"use one of: {', '.join(LAYOUTS)}")
    root = make_fixture_dataset(out_dir, layout, n=n, size=size, seed=seed, per_patient=per_patient)
    _stdout_console().print(f"wrote {n} synthetic {layout} images to {root}")
