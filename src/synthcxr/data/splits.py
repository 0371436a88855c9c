"""Patient-level, label-stratified, seeded train/val/test splits, saved to disk and reloadable.

Splitting by image would put follow-up images of one patient on both sides and flatter every
metric, so whole patients are assigned. Within each label the patients are shuffled with the seed
and cut by the val/test fractions, so every split keeps the label balance. The saved file, not the
algorithm, is the source of truth: once written, a split is reloaded rather than recomputed.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from synthcxr.data.config import SplitConfig
from synthcxr.data.records import XrayRecord
from synthcxr.errors import DataError
from synthcxr.fileio import atomic_write_json, atomic_write_text
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)
SPLITS = ("train", "val", "test")


def record_id(record: XrayRecord) -> str:
    """Portable id of a record (source + path inside its data set), the same on every machine."""
    rel = record.extra.get("relpath")
    return f"{record.source}/{rel}" if rel else record.key


def _patient_key(record: XrayRecord) -> str:
    return f"{record.source}/{record.patient_id}"


def _counts(n: int, val: float, test: float) -> tuple[int, int]:
    """Patients of one label for (val, test): rounded fractions, leaving at least one for training."""
    n_test = round(n * test)
    n_val = round(n * val)
    while n_val + n_test >= n and n > 0 and (n_val or n_test):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def assign_splits(records: list[XrayRecord], cfg: SplitConfig) -> dict[str, str]:
    """record_id -> 'train'|'val'|'test'. Depends only on the records' ids, labels and the seed."""
    patients: dict[str, list[XrayRecord]] = defaultdict(list)
    for record in records:
        patients[_patient_key(record)].append(record)
    by_label: dict[str, list[str]] = defaultdict(list)
    for patient, recs in patients.items():
        # a patient with images of several labels is stratified by its most frequent label
        label = Counter(r.label or "unlabelled" for r in recs).most_common(1)[0][0]
        by_label[label].append(patient)
    rng = random.Random(cfg.seed)
    assignment: dict[str, str] = {}
    for label in sorted(by_label):
        group = sorted(by_label[label])
        rng.shuffle(group)
        n_val, n_test = _counts(len(group), cfg.val, cfg.test)
        for i, patient in enumerate(group):
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            for record in patients[patient]:
                assignment[record_id(record)] = split
    return assignment


def save_split(path: Path, records: list[XrayRecord], assignment: dict[str, str], cfg: SplitConfig) -> Path:
    """JSON (with the settings) or CSV (one row per image) depending on the file suffix."""
    rows = [{"id": record_id(r), "patient_id": r.patient_id, "source": r.source, "label": r.label or "",
             "split": assignment[record_id(r)]} for r in records]
    rows.sort(key=lambda row: row["id"])
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write_text(path, buf.getvalue())
    summary = {s: sum(1 for r in rows if r["split"] == s) for s in SPLITS}
    return atomic_write_json(path, {"version": 1, "settings": _settings(cfg), "counts": summary, "images": rows})


def _settings(cfg: SplitConfig) -> dict:
    """What decides a split (where it is saved does not)."""
    return cfg.model_dump(exclude={"file"})


def read_split(path: Path) -> dict[str, str]:
    """record id -> split from a saved JSON or CSV split file."""
    try:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))["images"]
        assignment = {str(row["id"]): str(row["split"]) for row in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"split file cannot be read ({type(exc).__name__}: {exc})", file=path,
                        fix="delete it to recompute the split, or restore it from the run directory") from None
    bad = sorted({s for s in assignment.values() if s not in SPLITS})
    if bad:
        raise DataError(f"unknown split name(s) {bad}", file=path, fix=f"use only {', '.join(SPLITS)}")
    return assignment


def load_split(path: str | Path, records: list[XrayRecord]) -> dict[str, list[XrayRecord]]:
    """Apply a saved split to records; every record must be listed (a changed data set is an error)."""
    path = Path(path)
    assignment = read_split(path)
    missing = [record_id(r) for r in records if record_id(r) not in assignment]
    if missing:
        raise DataError(f"{len(missing)} image(s) are not in the saved split (e.g. {missing[0]}); the data set changed",
                        file=path, fix="write a new split to another file (--out), or restore the original data")
    return _group(records, assignment)


def _saved_settings(path: Path) -> dict | None:
    if path.suffix.lower() == ".csv":
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def _group(records: list[XrayRecord], assignment: dict[str, str]) -> dict[str, list[XrayRecord]]:
    out: dict[str, list[XrayRecord]] = {s: [] for s in SPLITS}
    for record in records:
        out[assignment[record_id(record)]].append(record)
    return out


def split_records(records: list[XrayRecord], split_cfg: SplitConfig, out_path: str | Path | None = None) -> dict[str, list[XrayRecord]]:
    """{'train','val','test'} -> records. With `out_path`: reuse the split saved there, else save it.

    With `split_cfg.file` that shared file is reused (or made) instead, and `out_path` gets a copy,
    so a run folder still records the split it trained on.
    """
    shared = Path(split_cfg.file) if split_cfg.file is not None else None
    if shared is not None and (out_path is None or Path(out_path).resolve() != shared.resolve()):
        groups = split_records(records, split_cfg, shared)
        if out_path is not None:
            atomic_write_text(Path(out_path), shared.read_text(encoding="utf-8"))
        return groups
    if out_path is not None and Path(out_path).exists():
        saved = _saved_settings(Path(out_path))
        if saved is not None and {k: v for k, v in saved.items() if k != "file"} != _settings(split_cfg):
            raise DataError(f"a split made with other settings ({saved}) is already saved here; it is never overwritten",
                            file=out_path, fix="write to another file (--out), or use the same val/test/seed")
        log.info("reusing the split saved in %s", out_path)
        return load_split(out_path, records)
    if not records:
        raise DataError("no records to split", fix="check the data path (synthcxr data inspect PATH)")
    assignment = assign_splits(records, split_cfg)
    groups = _group(records, assignment)
    if out_path is not None:
        save_split(Path(out_path), records, assignment, split_cfg)
        log.info("saved split (train %d, val %d, test %d images) to %s",
                 *(len(groups[s]) for s in SPLITS), out_path)
    return groups
