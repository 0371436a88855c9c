"""The output folder's `manifest.jsonl`: what is finished, and whether a re-run may continue it.

A manifest line is appended only after its image file is completely on disk (atomic rename), so a
listed file whose sha256 still matches is finished and is never redone. A re-run with different
settings is refused instead of mixing two generations in one folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthcxr.errors import ConfigError
from synthcxr.fileio import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    hash_strings,
    read_jsonl,
    sha256_file,
)
from synthcxr.generate.prompts import ImageJob
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.jsonl"
SHARD_GLOB = "manifest.shard-*.jsonl"
"""Lines written by one process of a sharded generation; merged into MANIFEST by the lock holder."""
RUN_SETTINGS = ("model", "scheduler", "steps", "guidance", "resolution", "dtype", "prediction_type")
"""Settings shared by every image of one generation."""
IMAGE_SETTINGS = (*RUN_SETTINGS, "prompt", "negative_prompt", "seed", "privacy_filter", "vae_tiling")
"""Settings that decide one image; a listed image must agree on all of them to be reused."""


def file_name(index: int, suffix: str) -> str:
    return f"{index:05d}{suffix}"


def plan_rows(jobs: list[ImageJob], *, model: str, scheduler: str, steps: int, guidance: float,
              resolution: int, dtype: str, suffix: str, prediction_type: str) -> dict[str, dict[str, Any]]:
    """Manifest rows (without sha256/created) of every planned image, keyed by file name."""
    rows = {}
    for job in jobs:
        row: dict[str, Any] = {
            "file": file_name(job.index, suffix), "index": job.index, "prompt": job.prompt,
            "negative_prompt": job.negative_prompt, "seed": job.seed, "model": model, "scheduler": scheduler,
            "steps": steps, "guidance": guidance, "resolution": resolution, "dtype": dtype,
            "prediction_type": prediction_type,
        }
        row.update({k: v for k, v in job.attributes.items() if v is not None})
        rows[row["file"]] = row
    return rows


def shard_manifest(rank: int) -> str:
    return f"manifest.shard-{rank:05d}.jsonl"


def _read_rows(out: Path) -> dict[str, dict[str, Any]]:
    """The manifest's lines and any shard manifests' lines, by file name (a repeated line: the last wins)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in (out / MANIFEST, *sorted(out.glob(SHARD_GLOB))):
        for row in read_jsonl(path):
            if "file" in row:
                rows[row["file"]] = row
    return rows


def merge_shards(out: Path) -> int:
    """Fold the shard manifests into MANIFEST (one atomic rewrite, in index order); returns lines merged.

    Only the holder of the output lock calls this, when no shard is being written.
    """
    shards = sorted(Path(out).glob(SHARD_GLOB))
    if not shards:
        return 0
    rows = _read_rows(Path(out))
    ordered = sorted(rows.values(), key=lambda r: (r.get("index", 0), r["file"]))
    atomic_write_text(Path(out) / MANIFEST, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in ordered))
    merged = sum(len(read_jsonl(p)) for p in shards)
    for path in shards:
        path.unlink()
    return merged


def _differences(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


@dataclass
class ManifestState:
    """Finished images of an output folder, and the writer that adds new ones."""

    out: Path
    planned: dict[str, dict[str, Any]]
    done: set[int] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)
    """Planned file name of each image index."""
    shard_file: str | None = None
    """Where this process appends its lines (a shard manifest), when several processes share the folder."""

    @property
    def path(self) -> Path:
        return self.out / MANIFEST

    @property
    def series_key(self) -> str:
        """Stable id of this generation (DICOM study/series UIDs derive from it)."""
        first = next(iter(self.planned.values()), {})
        return hash_strings([str(self.out.resolve()), *(str(first.get(k)) for k in RUN_SETTINGS)])

    @classmethod
    def open(cls, out: Path, planned: dict[str, dict[str, Any]], *, shard_file: str | None = None,
             readonly: bool = False) -> ManifestState:
        """`readonly`: only read what is done (other processes of the same generation may be writing);
        otherwise shard manifests left by an interrupted sharded run are merged first."""
        state = cls(Path(out), planned, names={r["index"]: name for name, r in planned.items()}, shard_file=shard_file)
        if not readonly:
            merge_shards(state.out)
        state._check_existing(readonly)
        return state

    def _check_existing(self, readonly: bool = False) -> None:
        refuse_fix = (f"choose a new output folder (--out), or re-run with the settings saved in "
                      f"{self.out / 'generate_config.yaml'}; nothing was changed")
        if not self.path.exists() and not any(self.out.glob(SHARD_GLOB)):
            clashes = [f for f in self.planned if (self.out / f).exists()]
            if clashes:
                raise ConfigError(f"output folder already holds {len(clashes)} image file(s) that this generation "
                                  f"would write (e.g. {clashes[0]}) but no {MANIFEST}", file=self.out, fix=refuse_fix)
            return
        rows = _read_rows(self.out)
        any_planned = next(iter(self.planned.values()), None)
        stale = []
        for name, row in rows.items():
            want = self.planned.get(name)
            diffs = _differences(row, want, IMAGE_SETTINGS) if want else (
                _differences(row, any_planned, RUN_SETTINGS) if any_planned else [])
            if diffs:
                raise ConfigError(f"output folder holds images from different settings ({name}: {'; '.join(diffs[:3])})",
                                  file=self.out, fix=refuse_fix)
            path = self.out / name
            if not path.exists():
                log.warning("%s is listed in the manifest but missing; it will be generated again", path)
                stale.append(name)
                continue
            if want is None:
                continue  # an image beyond this run's n, from the same settings: kept as it is
            if sha256_file(path) != row.get("sha256"):
                raise ConfigError(f"{name} changed after it was generated (its sha256 no longer matches {MANIFEST})",
                                  file=path, fix="move the file out of the folder to have it generated again, "
                                  "or choose a new output folder")
            self.done.add(want["index"])
        if stale and not readonly:  # drop lines of deleted files so the manifest lists each image once
            kept = [r for n, r in rows.items() if n not in stale]
            atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in kept))
        leftovers = [f for f, r in self.planned.items() if r["index"] not in self.done and (self.out / f).exists()
                     and f not in rows]
        if leftovers:
            log.info("%d unlisted file(s) from an interrupted run will be written again (e.g. %s)",
                     len(leftovers), leftovers[0])
        if self.done:
            log.info("resuming: %d of %d images already in %s", len(self.done), len(self.planned), self.out)

    def write(self, index: int, data: bytes, *, created: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write one image atomically, then append its manifest line (plus `extra` fields); returns the line."""
        from synthcxr.fileio import sha256_bytes

        name = self.names[index]
        atomic_write_bytes(self.out / name, data)
        row = {**self.planned[name], **(extra or {}), "sha256": sha256_bytes(data), "created": created}
        append_jsonl(self.out / self.shard_file if self.shard_file else self.path, row)
        self.done.add(index)
        return row
