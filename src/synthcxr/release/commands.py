"""`synthcxr export-dataset`: options -> `ExportOptions` -> `export_dataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_dataset(
    gen_dir: Annotated[Path, typer.Argument(help="Output folder of `synthcxr generate` (with manifest.jsonl).")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the data set (must not exist).")],
    format: Annotated[str, typer.Option("--format", help="imagefolder, parquet or webdataset.")] = "imagefolder",
    shard_size: Annotated[int, typer.Option(help="Images per shard (subfolder, Parquet file or tar file).")] = 1000,
    evaluation: Annotated[Path | None, typer.Option(help="`synthcxr evaluate` results JSON: removes flagged near copies; numbers go into the card.")] = None,
    label_scores: Annotated[Path | None, typer.Option(help="CSV file,score: real-trained classifier's positive-class probability per image (default: the one --evaluation saved).")] = None,
    label_threshold: Annotated[float, typer.Option(help="Score threshold of the conditioning filter.")] = 0.5,
    conditioning: Annotated[bool, typer.Option("--conditioning/--no-conditioning", help="Conditioning-fidelity filter (on --label-scores, else on the scores --evaluation saved).")] = True,
    dedupe: Annotated[bool, typer.Option("--dedupe/--no-dedupe", help="Remove images with identical pixels.")] = True,
    name: Annotated[str | None, typer.Option(help="Data set name in the card (default: the --out folder's name).")] = None,
) -> None:
    """Export a generation as a loadable data set with metadata, checksums and a data set card."""
    from synthcxr.errors import ConfigError, did_you_mean
    from synthcxr.release.export import FORMATS, ExportOptions
    from synthcxr.release.export import export_dataset as run

    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}{did_you_mean(format, FORMATS)}", fix=f"use one of: {', '.join(FORMATS)}")
    summary = run(gen_dir, out, ExportOptions(format=format, shard_size=shard_size, evaluation=evaluation,  # type: ignore[arg-type]
                                              label_scores=label_scores, label_threshold=label_threshold,
                                              conditioning=conditioning, dedupe=dedupe, name=name))
    removed = ", ".join(f"{f['name']} -{f['removed']}" for f in summary["filters"]) or "no filters"
    typer.echo(f"{summary['images_out']} of {summary['images_in']} images ({removed}) in {summary['shards']} "
               f"{format} shard(s): {out.resolve()} (card: README.md, checksums: SHA256SUMS)")
