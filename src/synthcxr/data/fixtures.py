"""Small synthetic data sets in every native layout, for tests, the demo and trying the CLI.

The images are plausible enough for a pipeline to learn something in a few steps (a bright body, two
dark lung fields, a spine and heart shadow, noise; TB cases get bright nodules in the upper lung
zones) and the readings files vary in case, spacing, units, blank lines, BOM and line endings like
the real sets do. Nothing here is real patient data.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from synthcxr.data.records import NORMAL, TUBERCULOSIS

LAYOUTS = ("shenzhen", "montgomery", "folder", "dicom", "nih", "chexpert", "mimic")
TB_FINDINGS = ("STB,ATB in the right upper field", "PTB in the left lower field",
               "secondary PTB in the bilateral upper fields", "STB,calcification in the left upper field")
NORMAL_SPELLINGS = ("normal", "Normal.", "NORMAL", "normal ")


def fixture_attributes(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """The ground truth behind `make_fixture_dataset` (same n and seed): sex, age, label, finding.

    Labels alternate normal/TB and sexes alternate within each label; every 6th case is an infant
    whose age is written in months.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = NORMAL if i % 2 == 0 else TUBERCULOSIS
        sex = "male" if (i // 2) % 2 == 0 else "female"
        months = i % 6 == 5
        age = round(rng.randint(2, 11) / 12, 4) if months else float(rng.randint(18, 80))
        finding = NORMAL if label == NORMAL else TB_FINDINGS[(i // 2) % len(TB_FINDINGS)]
        rows.append({"index": i, "label": label, "sex": sex, "age": age, "age_in_months": months, "finding": finding})
    return rows


def synthetic_xray(size: int, tb: bool, rng: np.random.Generator) -> np.ndarray:
    """A float32 size x size chest-X-ray-like image in [0, 1] (bright = dense, MONOCHROME2)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.08, dtype=np.float32)  # air around the patient

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0

    jitter = lambda s: float(rng.normal(0, s))  # noqa: E731
    img[ellipse(0.5 + jitter(0.01), 0.55, 0.44 + jitter(0.01), 0.5)] = 0.7  # soft tissue of the thorax
    for side in (-1, 1):  # lungs: the patient's right lung is on the image's left
        img[ellipse(0.5 + side * (0.19 + jitter(0.01)), 0.48 + jitter(0.01), 0.15, 0.3 + jitter(0.01))] = 0.22
    img[ellipse(0.57 + jitter(0.01), 0.66, 0.13, 0.12)] = 0.62  # heart shadow, to the patient's left
    img[np.abs(xx - 0.5) < 0.035] = np.maximum(img[np.abs(xx - 0.5) < 0.035], 0.8)  # spine
    for k in range(6):  # ribs: faint arcs
        y0 = 0.25 + 0.08 * k
        img[(np.abs(yy - y0 - 0.08 * (xx - 0.5) ** 2) < 0.008) & (img < 0.5)] += 0.12
    if tb:
        for _ in range(int(rng.integers(3, 6))):
            cx = 0.5 + rng.choice([-1, 1]) * rng.uniform(0.1, 0.27)
            cy = rng.uniform(0.25, 0.45)
            r = rng.uniform(0.02, 0.05)
            img[ellipse(cx, cy, r, r)] = 0.75
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    # light blur (box filter) so the edges look like a radiograph rather than a cartoon
    padded = np.pad(img, 1, mode="edge")
    img = sum(padded[dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)) / 9.0
    return np.clip(img, 0, 1).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(img * 255).astype(np.uint8)


def _shenzhen_text(i: int, row: dict[str, Any]) -> str:
    sex, finding = row["sex"], row["finding"]
    if finding == NORMAL:
        finding = NORMAL_SPELLINGS[i % len(NORMAL_SPELLINGS)]
    age = f"{round(row['age'] * 12)}months" if row["age_in_months"] else None
    styles = [
        lambda a: f"{sex} {a or str(int(row['age'])) + 'yrs'}\n{finding}\n",
        lambda a: f"{sex.capitalize()}  {a or str(int(row['age'])) + 'yr'}\r\n\r\n{finding}\r\n",
        lambda a: f"\ufeff{sex.upper()} {a or str(int(row['age'])) + ' years'}\n\n\n{finding}\n",
        lambda a: f"  {sex}{a or str(int(row['age'])) + 'Y'} \n{finding}\n\n",
    ]
    return styles[i % len(styles)](age)


def _montgomery_text(i: int, row: dict[str, Any]) -> str:
    sex = "M" if row["sex"] == "male" else "F"
    age = f"{round(row['age'] * 12):03d}M" if row["age_in_months"] else f"{int(row['age']):03d}Y"
    finding = row["finding"] if row["finding"] != NORMAL else NORMAL_SPELLINGS[i % len(NORMAL_SPELLINGS)]
    styles = [
        f"Patient's Sex: {sex}\nPatient's Age: {age}\n{finding}\n",
        f"Patient's Sex: {sex}\r\nPatient's Age: {age}\r\n\r\n{finding}\r\n",
        f"patient's sex:  {sex.lower()} \npatient's age: {age.lower()}\n\n{finding}\n",
        f"\ufeffPatient's Sex: {sex}\n\nPatient's Age: {age}\n\n{finding}\n\n",
    ]
    return styles[i % len(styles)]


def _write_native(out_dir: Path, layout: str, folder: str, prefix: str, text_fn, n: int, size: int, seed: int,
                  sixteen_bit_every: int = 0) -> Path:
    root = out_dir / folder
    (root / "CXR_png").mkdir(parents=True, exist_ok=True)
    (root / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, LAYOUTS.index(layout)])  # distinct images per layout
    for i, row in enumerate(fixture_attributes(n, seed)):
        stem = f"{prefix}_{i + 1:04d}_{0 if row['label'] == NORMAL else 1}"
        img = synthetic_xray(size, row["label"] == TUBERCULOSIS, rng)
        if sixteen_bit_every and i % sixteen_bit_every == sixteen_bit_every - 1:
            # 12-bit detector data in a 16-bit PNG, as some exports store it
            Image.fromarray(np.round(img * 4095).astype(np.uint16)).save(root / "CXR_png" / f"{stem}.png")
        else:
            Image.fromarray(_to_uint8(img), mode="L").save(root / "CXR_png" / f"{stem}.png")
        (root / "ClinicalReadings" / f"{stem}.txt").write_bytes(text_fn(i, row).encode("utf-8"))
    return root


def _write_folder(out_dir: Path, n: int, size: int, seed: int) -> Path:
    """Mixed formats in sub-folders with a CSV manifest; every 4th patient has two images."""
    root = out_dir / "xray_folder"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, LAYOUTS.index("folder")])  # distinct images per layout
    rows = []
    patient = 0
    for i, attrs in enumerate(fixture_attributes(n, seed)):
        img = synthetic_xray(size, attrs["label"] == TUBERCULOSIS, rng)
        kind = i % 6
        if kind == 0:
            name, pil = f"img_{i:03d}.png", Image.fromarray(_to_uint8(img), mode="L")
        elif kind == 1:
            name, pil = f"img_{i:03d}.png", Image.fromarray(np.round(img * 65535).astype(np.uint16))
        elif kind == 2:
            name, pil = f"img_{i:03d}.jpg", Image.fromarray(_to_uint8(img), mode="L").convert("RGB")
        elif kind == 3:
            rgba = Image.fromarray(_to_uint8(img), mode="L").convert("RGBA")
            name, pil = f"img_{i:03d}.png", rgba
        elif kind == 4:
            name, pil = f"img_{i:03d}.png", Image.fromarray(_to_uint8(img), mode="L").convert("P")
        else:
            name, pil = f"img_{i:03d}.tif", Image.fromarray(np.round(img * 65535).astype(np.uint16))
        pil.save(root / "images" / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        sex, age = attrs["sex"], attrs["age"]
        if i % 4 == 1:  # a follow-up image (i = 1, 5, ...) of the previous patient
            sex, age = rows[-1]["sex"], rows[-1]["age"]
        else:
            patient += 1
        rows.append({"file": f"images/{name}", "caption": "", "label": attrs["label"], "patient_id": f"P{patient:03d}",
                     "sex": sex[0].upper() if len(sex) > 1 else sex, "age": age, "finding": attrs["finding"]})
    _write_csv(root / "manifest.csv", rows)
    return root


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def write_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 16,
                slope: float | None = None, intercept: float | None = None,
                window: tuple[float, float] | None = None, voi_lut: np.ndarray | None = None,
                voi_first: int = 0, patient_id: str = "ANON", sex: str = "", age: str = "",
                signed: bool = False) -> Path:
    """Write a valid single-frame DX DICOM with the given stored values and display attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.PatientID, ds.PatientName = patient_id, "Synthetic^Fixture"
    ds.PatientSex, ds.PatientAge = sex, age
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(ds.BitsAllocated, signed)]
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    if slope is not None or intercept is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope or 1.0, intercept or 0.0, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", [len(voi_lut), voi_first, 16])  # LUT Descriptor (ambiguous VR)
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUT Data
        ds.VOILUTSequence = [item]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_dicom_set(out_dir: Path, n: int, size: int, seed: int) -> Path:
    """DICOMs in four display conventions (plain 16-bit, MONOCHROME1, 12-bit rescaled + windowed,
    VOI LUT) plus a manifest with the labels, which DICOM headers do not carry."""
    root = out_dir / "dicom"
    rng = np.random.default_rng([seed, LAYOUTS.index("dicom")])
    rows = []
    for i, attrs in enumerate(fixture_attributes(n, seed)):
        img = synthetic_xray(size, attrs["label"] == TUBERCULOSIS, rng)
        sex = "M" if attrs["sex"] == "male" else "F"
        age = f"{round(attrs['age'] * 12):03d}M" if attrs["age_in_months"] else f"{int(attrs['age']):03d}Y"
        name = f"IM{i:04d}.dcm"
        common = {"patient_id": f"PAT{i:04d}", "sex": sex, "age": age}
        kind = i % 4
        if kind == 0:
            write_dicom(root / name, np.round(img * 65535), bits_stored=16, **common)
        elif kind == 1:  # MONOCHROME1: stored values are inverted (dense = dark)
            write_dicom(root / name, np.round((1 - img) * 4095), photometric="MONOCHROME1", bits_stored=12, **common)
        elif kind == 2:  # 12-bit with a rescale and a window that covers the image range
            write_dicom(root / name, np.round(img * 4095), bits_stored=12, slope=2.0, intercept=-1000.0,
                        window=(3095.0, 8190.0), **common)
        else:  # VOI LUT: identity curve over 12 bits into 16-bit output
            lut = np.round(np.linspace(0, 65535, 4096)).astype(np.int64)
            write_dicom(root / name, np.round(img * 4095), bits_stored=12, voi_lut=lut, **common)
        rows.append({"file": name, "label": attrs["label"], "finding": attrs["finding"]})
    _write_csv(root / "manifest.csv", rows)
    return root


def make_fixture_dataset(out_dir: str | Path, layout: str = "shenzhen", n: int = 8, size: int = 64, seed: int = 0,
                         per_patient: int = 3) -> Path:
    """Write `n` synthetic images of `size` px in `layout` under `out_dir`; returns the data set root.

    Roots: `ChinaSet_AllFiles` (shenzhen), `MontgomerySet` (montgomery), `xray_folder` (folder, with
    manifest.csv and mixed 8/16-bit PNG, JPEG, RGBA, palette and TIFF files), `dicom` (DICOMs incl.
    MONOCHROME1, 12-bit with rescale + window, and a VOI LUT; labels in manifest.csv). Several layouts
    can share one `out_dir`, which `format: auto` then reads together. `nih`, `chexpert` and `mimic`
    write the public sets' CSV layouts with `per_patient` images per patient sharing one anatomy
    (`fixtures_public`).
    """
    out_dir = Path(out_dir)
    if layout == "shenzhen":
        return _write_native(out_dir, layout, "ChinaSet_AllFiles", "CHNCXR", _shenzhen_text, n, size, seed)
    if layout == "montgomery":
        return _write_native(out_dir, layout, "MontgomerySet", "MCUCXR", _montgomery_text, n, size, seed, sixteen_bit_every=4)
    if layout == "folder":
        return _write_folder(out_dir, n, size, seed)
    if layout == "dicom":
        return _write_dicom_set(out_dir, n, size, seed)
    if layout in ("nih", "chexpert", "mimic"):
        from synthcxr.data.fixtures_public import make_public_fixture

        return make_public_fixture(out_dir, layout, n=n, size=size, seed=seed, per_patient=per_patient)
    raise ValueError(f"unknown fixture layout {layout!r}; use one of {', '.join(LAYOUTS)}")
