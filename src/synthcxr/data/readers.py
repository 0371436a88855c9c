"""Readers: one per data set layout, each turning a folder into `XrayRecord`s plus a list of problems.

Readers never stop at the first bad file: they collect a `Problem` (file, what is wrong, how to fix
it) for each one and carry on, so `data inspect` and `on_error: fail` can list everything at once.
A record is only emitted when its own files were read cleanly. Layouts are registry entries
(`READERS[name]`); `detect_layouts` finds them under a dataset root or its parent.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synthcxr.data.dicom import DICOM_SUFFIXES, dicom_to_float, is_dicom_file
from synthcxr.data.preprocess import IMAGE_SUFFIXES
from synthcxr.data.readings import (
    UNKNOWN_SEX,
    Reading,
    ReadingsParseError,
    label_from_suffix,
    normalize_finding,
    normalize_label,
    parse_age,
    parse_montgomery,
    parse_sex,
    parse_shenzhen,
    read_text,
)
from synthcxr.data.records import XrayRecord
from synthcxr.errors import DataError, Problem
from synthcxr.fileio import sha256_bytes
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)

# Files that routinely sit next to images and are not data problems.
SIDE_FILE_SUFFIXES = {".csv", ".jsonl", ".json", ".txt", ".md", ".yaml", ".yml", ".pdf", ".docx", ".xlsx", ".html"}
IGNORED_NAMES = {"thumbs.db", "desktop.ini"}
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "metadata.csv", "metadata.jsonl")
FILE_COLUMNS = ("file", "path", "image", "filename", "image_path")


@dataclass
class ScanResult:
    """What a reader found: clean records and every problem, in file order."""

    records: list[XrayRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    image_only: list[XrayRecord] = field(default_factory=list)
    """Images left out for a metadata problem; `data inspect` still checks their pixels, so one pass
    reports a truncated or duplicate image even when its readings file is also missing."""

    def extend(self, other: ScanResult) -> None:
        self.records += other.records
        self.problems += other.problems
        self.image_only += other.image_only


def _visible_files(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in files:
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel) or p.name.lower() in IGNORED_NAMES or not p.is_file():
            continue
        out.append(p)
    return sorted(out)


def _with_progress(items: list, description: str, threshold: int = 200) -> Iterator:
    """Iterate, with a progress bar (and ETA) when the list is long enough to take a while (DICOM decoding)."""
    if len(items) < threshold:
        yield from items
        return
    with progress_bar(len(items), description) as (progress, task):
        for item in items:
            yield item
            progress.advance(task)


class Reader:
    """A data set layout: `detect` finds its roots under a path, `scan` reads one root."""

    name: str = ""

    def detect(self, path: Path) -> list[Path]:
        raise NotImplementedError

    def scan(self, root: Path, manifest: Path | None = None, resolution: int | None = None,
             keep_pixels: bool = True) -> ScanResult:
        raise NotImplementedError


class NativeTBReader(Reader):
    """The NLM TB sets: `<root>/CXR_png/<PREFIX>_####_<0|1>.png` + `<root>/ClinicalReadings/<same>.txt`."""

    def __init__(self, name: str, folder: str, prefix: str, parse: Callable[[str], Reading], example: str):
        self.name, self.folder, self.prefix, self.parse, self.example = name, folder, prefix, parse, example

    def _looks_like(self, root: Path) -> bool:
        images = root / "CXR_png"
        if not images.is_dir():
            return False
        if root.name.lower() == self.folder.lower():
            return True
        return any(p.name.upper().startswith(self.prefix) for p in images.iterdir())

    def detect(self, path: Path) -> list[Path]:
        if path.name == "CXR_png" and self._looks_like(path.parent):
            return [path.parent]
        if self._looks_like(path):
            return [path]
        return [c for c in sorted(path.iterdir()) if c.is_dir() and self._looks_like(c)] if path.is_dir() else []

    def scan(self, root: Path, manifest: Path | None = None, resolution: int | None = None,
             keep_pixels: bool = True) -> ScanResult:
        result = ScanResult()
        images_dir, readings_dir = root / "CXR_png", root / "ClinicalReadings"
        if not images_dir.is_dir():
            result.problems.append(Problem(images_dir, "image folder CXR_png not found",
                                           f"point the path at the {self.folder} folder that holds CXR_png/"))
            return result
        readings = ({p.stem.lower(): p for p in _visible_files(readings_dir, False) if p.suffix.lower() == ".txt"}
                    if readings_dir.is_dir() else {})
        files = _visible_files(images_dir, False)
        pngs = []
        for path in files:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                pngs.append(path)
            else:
                result.problems.append(Problem(path, f"not an image file ({path.suffix or 'no extension'}) in CXR_png",
                                               "move it out of the image folder"))
        if not pngs:
            result.problems.append(Problem(images_dir, "empty folder: no images found",
                                           f"copy the {self.folder} PNGs ({self.prefix}_####_0.png) into it"))
            return result
        def image_only(path: Path) -> XrayRecord:
            return XrayRecord(image_path=path, patient_id=re.sub(r"_[01]$", "", path.stem), source=self.name)

        if not readings_dir.is_dir():
            result.problems.append(Problem(readings_dir, "ClinicalReadings folder not found",
                                           f"add the set's ClinicalReadings/*.txt next to CXR_png in {root}"))
            result.image_only += [image_only(path) for path in pngs]
            return result
        for path in pngs:
            text_path = readings.get(path.stem.lower())
            if text_path is None:
                result.problems.append(Problem(readings_dir / f"{path.stem}.txt", f"missing readings file for image {path.name}",
                                               f"add {path.stem}.txt to ClinicalReadings (first lines like {self.example!r})"))
                result.image_only.append(image_only(path))
                continue
            try:
                reading = self.parse(read_text(text_path))
            except (ReadingsParseError, OSError) as exc:
                result.problems.append(Problem(text_path, f"unparseable readings: {exc}",
                                               f"edit the file so it starts like {self.example!r}"))
                result.image_only.append(image_only(path))
                continue
            label = label_from_suffix(path.stem)
            result.records.append(XrayRecord(
                image_path=path,
                patient_id=re.sub(r"_[01]$", "", path.stem),
                source=self.name,
                sex=reading.sex,
                age=reading.age,
                finding=reading.finding or label,
                label=label,
                extra={"relpath": path.relative_to(root).as_posix(), "readings": str(text_path)},
            ))
        return result


def read_manifest(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[Problem]]:
    """Rows of a CSV or JSONL manifest as (line number, row); broken rows become problems."""
    rows: list[tuple[int, dict[str, str]]] = []
    problems: list[Problem] = []
    try:
        text = read_text(path)
    except (OSError, ReadingsParseError) as exc:
        return rows, [Problem(path, f"manifest cannot be read: {exc}", "write it as UTF-8 CSV or JSONL")]
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(path, f"line {n} is not valid JSON ({exc.msg})", "fix or delete that line"))
                continue
            if not isinstance(row, dict):
                problems.append(Problem(path, f"line {n} is not a JSON object", 'write one {"file": ...} object per line'))
                continue
            rows.append((n, {str(k).strip().lower(): v for k, v in row.items()}))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            n = reader.line_num  # the file line where this row ends (quoted values may span lines)
            if None in row:
                problems.append(Problem(path, f"line {n} has more values than the header has columns",
                                        "quote values that contain commas"))
                row.pop(None)
            rows.append((n, {str(k).strip().lower(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}))
    if rows and not any(c in rows[0][1] for c in FILE_COLUMNS):
        problems.append(Problem(path, f"no file column (have: {', '.join(rows[0][1])})",
                                f"name the image column one of: {', '.join(FILE_COLUMNS)}"))
        return [], problems
    return rows, problems


def _row_file(row: dict[str, str]) -> str | None:
    for c in FILE_COLUMNS:
        if row.get(c):
            return str(row[c]).strip()
    return None


def shrink(pixels: np.ndarray, resolution: int | None) -> np.ndarray:
    """Downscale a decoded image so its shorter side is the training resolution.

    A 3000 x 3000 float32 radiograph is 36 MB; kept at the resolution it is used at, a few thousand
    DICOM records fit in memory. Preprocessing then only crops or pads.
    """
    if resolution is None:
        return pixels
    h, w = pixels.shape[:2]
    target = resolution
    if min(h, w) <= target:
        return pixels
    from PIL import Image

    scale = target / min(h, w)
    img = Image.fromarray(pixels.astype(np.float32), mode="F").resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(img, dtype=np.float32), 0, 1)


class FolderReader(Reader):
    """Any folder (searched recursively) of PNG/JPEG/TIFF/BMP and/or DICOM files, with an optional manifest."""

    def __init__(self, name: str, images: bool, dicom: bool):
        self.name, self.images, self.dicom = name, images, dicom

    def _kind(self, path: Path) -> str | None:
        suffix = path.suffix.lower()
        if self.images and suffix in IMAGE_SUFFIXES:
            return "image"
        if self.dicom and (suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES | SIDE_FILE_SUFFIXES and is_dicom_file(path))):
            return "dicom"
        return None

    def detect(self, path: Path) -> list[Path]:
        if not path.is_dir():
            return []
        for i, p in enumerate(_visible_files(path, True)):
            if self._kind(p):
                return [path]
            if i > 2000:
                break
        return []

    def _find_manifest(self, root: Path, manifest: Path | None) -> Path | None:
        if manifest is not None:
            return manifest
        found = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
        return found[0] if found else None

    def _dicom_record(self, path: Path, root: Path, resolution: int | None, keep_pixels: bool) -> XrayRecord:
        import pydicom

        ds = pydicom.dcmread(path)
        pixels = shrink(dicom_to_float(path, ds), resolution)
        pixel_hash = sha256_bytes(ds.PixelData) if "PixelData" in ds else None
        age = None
        try:
            age = parse_age(str(ds.get("PatientAge", "") or ""))
        except ReadingsParseError:
            log.debug("%s: PatientAge %r not understood; age left unknown", path, ds.get("PatientAge"))
        return XrayRecord(
            image_path=path,
            patient_id=str(ds.get("PatientID", "") or "").strip() or path.stem,
            source=self.name,
            sex=parse_sex(ds.get("PatientSex")),
            age=age,
            pixels=pixels if keep_pixels else None,
            extra={"relpath": path.relative_to(root).as_posix(), "sha256": pixel_hash, "format": "dicom",
                   "photometric": str(ds.get("PhotometricInterpretation", "")),
                   "bits_stored": int(ds.get("BitsStored", 0) or 0)},
        )

    def _record(self, path: Path, root: Path, resolution: int | None, result: ScanResult,
                keep_pixels: bool = True) -> XrayRecord | None:
        if self._kind(path) == "dicom":
            try:
                return self._dicom_record(path, root, resolution, keep_pixels)
            except Exception as exc:  # pydicom raises many types for broken files
                result.problems.append(Problem(path, f"unreadable DICOM: {type(exc).__name__}: {exc}",
                                               "re-export the file from the PACS; for compressed transfer syntaxes "
                                               "install pylibjpeg (pip install pylibjpeg pylibjpeg-libjpeg)"))
                return None
        return XrayRecord(image_path=path, patient_id=path.stem, source=self.name,
                          label=None, extra={"relpath": path.relative_to(root).as_posix()})

    def scan(self, root: Path, manifest: Path | None = None, resolution: int | None = None,
             keep_pixels: bool = True) -> ScanResult:
        result = ScanResult()
        manifest = self._find_manifest(root, manifest)
        files = _visible_files(root, True)
        usable = []
        for path in files:
            if self._kind(path):
                usable.append(path)
            elif manifest is not None and path.resolve() == manifest.resolve():
                continue
            elif path.suffix.lower() not in SIDE_FILE_SUFFIXES:
                what = "a DICOM" if self.dicom and not self.images else "an image"
                result.problems.append(Problem(path, f"not {what} file ({path.suffix or 'no extension'})",
                                               "move it out of the data folder, or convert it to PNG/DICOM"))
        if not usable:
            kinds = "DICOM" if not self.images else "PNG/JPEG/TIFF"
            result.problems.append(Problem(root, f"empty folder: no {kinds} images found",
                                           "point the path at the folder holding the images"))
            return result
        if manifest is None:
            for path in _with_progress(usable, f"reading {root.name}"):
                if (record := self._record(path, root, resolution, result, keep_pixels)) is not None:
                    result.records.append(record)
            return result
        return self._scan_manifest(root, manifest, usable, resolution, result, keep_pixels)

    def _scan_manifest(self, root: Path, manifest: Path, usable: list[Path], resolution: int | None,
                       result: ScanResult, keep_pixels: bool) -> ScanResult:
        if not manifest.is_file():
            result.problems.append(Problem(manifest, "manifest not found", "check the manifest path"))
            return result
        rows, problems = read_manifest(manifest)
        result.problems += problems
        listed = set()
        for line, row in _with_progress(rows, f"reading {root.name}"):
            name = _row_file(row)
            if not name:
                result.problems.append(Problem(manifest, f"line {line}: empty file column", "fill in the image file name"))
                continue
            candidates = [manifest.parent / name, root / name]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                result.problems.append(Problem(manifest, f"line {line}: image {name!r} not found",
                                               f"fix the file name, or put the image in {root}"))
                continue
            listed.add(path.resolve())
            try:
                age = parse_age(row.get("age"))
            except ReadingsParseError as exc:
                result.problems.append(Problem(manifest, f"line {line}: {exc}", "write the age in years, e.g. 45 or 044Y"))
                continue
            sex_value = row.get("sex")
            sex = parse_sex(sex_value)
            if sex is None and sex_value not in (None, "") and str(sex_value).strip().lower() not in UNKNOWN_SEX:
                result.problems.append(Problem(manifest, f"line {line}: sex {sex_value!r} is not M/F/male/female",
                                               "write M, F, male, female, or leave it empty"))
                continue
            before = len(result.problems)
            record = self._record(path, root, resolution, result, keep_pixels)
            if record is None or len(result.problems) > before:
                continue
            record.patient_id = str(row.get("patient_id") or "").strip() or record.patient_id
            record.sex = sex or record.sex
            record.age = age if age is not None else record.age
            record.finding = normalize_finding(str(row["finding"])) if row.get("finding") else None
            record.label = normalize_label(row.get("label"))
            record.caption = " ".join(str(row["caption"]).split()) if row.get("caption") else None
            record.source = str(row.get("source") or "").strip() or record.source
            known = {"patient_id", "sex", "age", "finding", "label", "caption", "source", *FILE_COLUMNS}
            record.extra.update({k: v for k, v in row.items() if k not in known and v not in (None, "")})
            record.extra["manifest"] = str(manifest)
            result.records.append(record)
        unlisted = [p for p in usable if p.resolve() not in listed]
        if unlisted:
            log.info("%s: %d image(s) in %s are not listed in the manifest and are left out (e.g. %s)",
                     manifest, len(unlisted), root, unlisted[0].name)
        return result


READERS: dict[str, Reader] = {
    "montgomery": NativeTBReader("montgomery", "MontgomerySet", "MCUCXR", parse_montgomery,
                                 "Patient's Sex: M / Patient's Age: 044Y / <finding>"),
    "shenzhen": NativeTBReader("shenzhen", "ChinaSet_AllFiles", "CHNCXR", parse_shenzhen, "male 35yrs / <finding>"),
    "folder": FolderReader("folder", images=True, dicom=True),
    "dicom": FolderReader("dicom", images=False, dicom=True),
}
from synthcxr.data.public_sets import PUBLIC_READERS  # noqa: E402 - they subclass Reader, defined above

READERS.update(PUBLIC_READERS)


def detect_layouts(path: Path) -> list[tuple[str, Path]]:
    """(reader name, dataset root) pairs found at `path`: native sets first (both may sit in one parent),
    else DICOM-only folders, else any image folder."""
    native = [(name, root) for name in ("montgomery", "shenzhen") for root in READERS[name].detect(path)]
    if native:
        return native
    public = [(name, root) for name in PUBLIC_READERS for root in READERS[name].detect(path)]
    if public:  # NIH / CheXpert / MIMIC tables: never walk their 100k images to guess a layout
        return public
    if READERS["folder"].detect(path):
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in _visible_files(path, True))
        return [("folder" if has_images else "dicom", path)]
    return []


def scan_paths(paths: list[Path], format: str = "auto", manifest: Path | None = None,
               resolution: int | None = None,
             keep_pixels: bool = True, frontal_only: bool = True) -> ScanResult:
    """Read every path with the given (or detected) layout; problems from all paths are combined.

    `frontal_only`: the public sets' readers keep PA/AP views only (the others have no view column)."""
    result = ScanResult()
    for path in paths:
        path = Path(path).expanduser()
        if not path.exists():
            result.problems.append(Problem(path, "path does not exist", "check the data path (data.path / PATH argument)"))
            continue
        if format == "auto":
            found = detect_layouts(path)
            if not found:
                result.problems.append(Problem(path, "empty folder: no images found" if path.is_dir() else "not a folder",
                                               "point the path at a Montgomery/Shenzhen set, a folder of images, or of DICOM files"))
                continue
        else:
            if format not in READERS:
                raise DataError(f"unknown data format {format!r}", fix=f"use one of: auto, {', '.join(READERS)}")
            roots = READERS[format].detect(path) if format in ("montgomery", "shenzhen", *PUBLIC_READERS) else []
            found = [(format, r) for r in roots] or [(format, path)]
        for name, root in found:
            log.debug("reading %s as %s", root, name)
            views = {"frontal_only": frontal_only} if getattr(READERS[name], "takes_views", False) else {}
            result.extend(READERS[name].scan(root, manifest=manifest, resolution=resolution, keep_pixels=keep_pixels,
                                             **views))
    return result
