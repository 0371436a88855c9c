"""`export_dataset`: a generation folder -> a released data set (shards + metadata + checksums + card).

Layouts (all load with the usual tools, see the README):
- imagefolder: `data/train/shard-NNNNN/*.png` with one `metadata.jsonl` per shard
  (`datasets.load_dataset("imagefolder", data_dir=OUT)`);
- parquet: `data/train-NNNNN-of-MMMMM.parquet`, an `image` column ({bytes, path}) with the
  Hugging Face feature types in the schema, so `load_dataset("parquet", ...)` decodes images;
- webdataset: `data/train-NNNNN.tar`, per image `KEY.png` + `KEY.json`.

The export is written into `OUT.partial` and renamed to `OUT` at the end: a folder at `OUT` is
always a complete export, and an existing `OUT` is never touched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from synthcxr.errors import ConfigError
from synthcxr.fileio import atomic_write_json, read_jsonl, sha256_file
from synthcxr.logging_utils import get_logger
from synthcxr.release import filters

log = get_logger(__name__)

Format = Literal["imagefolder", "parquet", "webdataset"]
FORMATS: tuple[str, ...] = ("imagefolder", "parquet", "webdataset")
SUMS = "SHA256SUMS"
SUMMARY = "export.json"
_MARK = ".synthcxr-export-in-progress"
METADATA_KEYS = ("prompt", "negative_prompt", "seed", "label", "sex", "age", "model", "run", "scheduler", "steps",
                 "guidance", "resolution", "index", "sha256")
"""Per-record metadata, in this order, plus `filters_passed` (the filters each record was checked by)."""
_TYPES = {"seed": "int64", "age": "float64", "steps": "int64", "guidance": "float64", "resolution": "int64",
          "index": "int64"}


@dataclass
class ExportOptions:
    format: Format = "imagefolder"
    shard_size: int = 1000
    """Images per shard (image folder subfolder, Parquet file or tar file)."""
    evaluation: Path | None = None
    """`synthcxr evaluate` results JSON: memorization flags are removed, its numbers go into the card."""
    label_scores: Path | None = None
    """`file,score` CSV of the real-trained classifier's positive-class probability (conditioning filter);
    default: the one the evaluation saved, when `evaluation` is given and ran the utility metric."""
    label_threshold: float = 0.5
    conditioning: bool = True
    """The conditioning filter (on `label_scores`, else on the scores the evaluation saved); False: none."""
    dedupe: bool = True
    name: str | None = None
    """Pretty name for the card (default: the output folder's name)."""


def _run_of(model: str) -> str | None:
    """The training run's folder name when the model is a synthcxr run directory."""
    path = Path(model)
    return path.name if (path / "config.yaml").is_file() else None


def read_generation(gen_dir: Path) -> list[dict[str, Any]]:
    """Manifest rows of a finished generation folder, in index order, each file present and unchanged."""
    from synthcxr.generate.manifest import MANIFEST

    manifest = gen_dir / MANIFEST
    if not gen_dir.is_dir():
        raise ConfigError("generation folder not found", file=gen_dir, fix="pass the --out folder of `synthcxr generate`")
    if not manifest.is_file():
        raise ConfigError(f"no {MANIFEST} in the generation folder", file=gen_dir,
                          fix="pass the --out folder of `synthcxr generate` (its manifest lists the finished images)")
    rows: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(manifest):
        if "file" in row:
            rows[row["file"]] = row
    if not rows:
        raise ConfigError("the manifest lists no images", file=manifest, fix="run `synthcxr generate` into this folder first")
    for row in rows.values():
        path = gen_dir / row["file"]
        if not path.is_file():
            raise ConfigError(f"{row['file']} is listed in the manifest but missing", file=path,
                              fix=f"re-run the same `synthcxr generate` into {gen_dir} (it regenerates missing images)")
        if row.get("sha256") and sha256_file(path) != row["sha256"]:
            raise ConfigError(f"{row['file']} changed after it was generated (its sha256 no longer matches)", file=path,
                              fix="move it out of the folder and re-run the same generate to make it again")
        row.setdefault("run", _run_of(str(row.get("model", ""))))
    return sorted(rows.values(), key=lambda r: r.get("index", 0))


def _metadata(row: dict[str, Any], passed: list[str]) -> dict[str, Any]:
    meta = {k: row.get(k) for k in METADATA_KEYS}
    meta["seed"] = row.get("seed_used", meta["seed"])  # privacy-filtered generation: the seed that made the file
    meta["filters_passed"] = passed
    return meta


# --------------------------------------------------------------------------- writers
def _shards(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _write_imagefolder(tmp: Path, gen_dir: Path, shards: list[list[dict[str, Any]]], meta: Callable) -> list[str]:
    written = []
    for s, shard in enumerate(shards):
        folder = tmp / "data" / "train" / f"shard-{s:05d}"
        folder.mkdir(parents=True)
        lines = []
        for row in shard:
            name = Path(row["file"]).name
            shutil.copyfile(gen_dir / row["file"], folder / name)
            lines.append(json.dumps({"file_name": name, **meta(row)}, sort_keys=False))
            written.append(str((folder / name).relative_to(tmp)))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        written.append(str((folder / "metadata.jsonl").relative_to(tmp)))
    return written


def _hf_features() -> dict[str, Any]:
    value = {k: {"dtype": _TYPES.get(k, "string"), "_type": "Value"} for k in METADATA_KEYS}
    return {"image": {"_type": "Image"}, **value, "filters_passed": {"feature": {"dtype": "string", "_type": "Value"},
                                                                       "_type": "List"}}


def _write_parquet(tmp: Path, gen_dir: Path, shards: list[list[dict[str, Any]]], meta: Callable) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))]
    fields += [pa.field(k, getattr(pa, _TYPES.get(k, "string"))()) for k in METADATA_KEYS]
    fields.append(pa.field("filters_passed", pa.list_(pa.string())))
    schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": _hf_features()}})})
    (tmp / "data").mkdir()
    written = []
    for s, shard in enumerate(shards):
        records = [{"image": {"bytes": (gen_dir / r["file"]).read_bytes(), "path": Path(r["file"]).name}, **meta(r)}
                   for r in shard]
        name = f"data/train-{s:05d}-of-{len(shards):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp / name)
        written.append(name)
    return written


def _write_webdataset(tmp: Path, gen_dir: Path, shards: list[list[dict[str, Any]]], meta: Callable) -> list[str]:
    (tmp / "data").mkdir()
    written = []
    for s, shard in enumerate(shards):
        name = f"data/train-{s:05d}.tar"
        with tarfile.open(tmp / name, "w", format=tarfile.PAX_FORMAT) as tar:
            for row in shard:
                src = gen_dir / row["file"]
                key = Path(row["file"]).stem
                for member, data in ((f"{key}{src.suffix}", src.read_bytes()),
                                     (f"{key}.json", json.dumps(meta(row)).encode())):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: same input, same bytes
                    tar.addfile(info, io.BytesIO(data))
        written.append(name)
    return written


WRITERS = {"imagefolder": _write_imagefolder, "parquet": _write_parquet, "webdataset": _write_webdataset}


# --------------------------------------------------------------------------- main entry
def export_dataset(gen_dir: str | os.PathLike, out: str | os.PathLike, opts: ExportOptions | None = None) -> dict[str, Any]:
    """Filter, shard and write the generation in `gen_dir` to `out`; returns the export summary."""
    from synthcxr.release.card import write_card

    opts = opts or ExportOptions()
    gen_dir, out = Path(gen_dir), Path(out)
    # 1. check inputs before any work
    if opts.format not in WRITERS:
        raise ConfigError(f"unknown format {opts.format!r}", fix=f"use one of: {', '.join(FORMATS)}")
    if opts.shard_size < 1:
        raise ConfigError(f"shard size {opts.shard_size} must be at least 1", fix="pass e.g. --shard-size 1000")
    if out.exists():
        raise ConfigError("the export folder already exists", file=out,
                          fix="choose a new --out folder (an export never writes into an existing folder)")
    if out.resolve() == gen_dir.resolve() or gen_dir.resolve() in out.resolve().parents:
        raise ConfigError("the export folder is inside the generation folder", file=out,
                          fix="choose an --out folder outside the generation folder")
    evaluation = filters.read_evaluation(opts.evaluation) if opts.evaluation else None
    scores_source = None
    if opts.conditioning:
        scores_source = opts.label_scores or (filters.evaluation_scores(evaluation, opts.evaluation)
                                              if evaluation is not None else None)
    scores = filters.read_scores(scores_source) if scores_source else None
    rows = read_generation(gen_dir)
    total = len(rows)

    # 2. filters, each on what the previous ones kept
    applied: list[filters.FilterResult] = []
    if opts.dedupe:
        result, _ = filters.duplicates(rows, gen_dir)
        applied.append(result)
        rows = filters.apply(rows, [result])
    if evaluation is not None and "memorization" in evaluation:
        applied.append(filters.memorization(rows, gen_dir, evaluation, opts.evaluation))
        rows = filters.apply(rows, applied[-1:])
    elif evaluation is not None:
        log.warning("%s holds no memorization check: no image was removed for memorization", opts.evaluation)
    if scores is not None:
        applied.append(filters.conditioning(rows, scores, opts.label_threshold, scores_source))
        rows = filters.apply(rows, applied[-1:])
    if not rows:
        raise ConfigError("the filters removed every image; nothing to export", file=gen_dir,
                          fix="see the counts above; loosen --label-threshold or check the evaluation")
    for f in applied:
        log.info("filter %s removed %d image(s)", f.name, len(f.removed))

    # 3. write shards, card and checksums into OUT.partial, then rename
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        if not (tmp / _MARK).is_file():
            raise ConfigError("a folder named like an unfinished export exists and was not made by an export", file=tmp,
                              fix="move it away or choose another --out")
        shutil.rmtree(tmp)  # our own leftover from an interrupted export
    tmp.mkdir(parents=True)
    (tmp / _MARK).touch()
    shards = _shards(rows, opts.shard_size)
    def passed(row: dict[str, Any]) -> list[str]:
        at_generation = ["privacy_filter"] if (row.get("privacy") or {}).get("decision") == "kept" else []
        return at_generation + [f.name for f in applied if f.checked is None or row["file"] in f.checked]

    files = WRITERS[opts.format](tmp, gen_dir, shards, lambda r: _metadata(r, passed(r)))
    summary = {
        "source": str(gen_dir.resolve()), "format": opts.format, "shard_size": opts.shard_size, "shards": len(shards),
        "images_in": total, "images_out": len(rows), "filters": [f.summary() for f in applied],
        "evaluation": str(opts.evaluation) if opts.evaluation else None,
        "label_scores": str(scores_source) if scores is not None else None,
    }
    atomic_write_json(tmp / SUMMARY, summary)
    write_card(tmp / "README.md", summary=summary, rows=rows, gen_dir=gen_dir, evaluation=evaluation,
               name=opts.name or out.name)
    sums = [f"{sha256_file(tmp / f)}  {f}" for f in sorted([*files, SUMMARY, "README.md"])]
    (tmp / SUMS).write_text("\n".join(sums) + "\n")
    (tmp / _MARK).unlink()
    os.replace(tmp, out)
    return summary
