"""Synthetic fixtures in the NIH ChestX-ray14, CheXpert and MIMIC-CXR-JPG layouts, with several images
per patient and patient-specific anatomy, so readers, patient-level splits and re-identification can
be tested without real data.

Each patient has an `anatomy` (thorax width, lung and heart geometry, spine width, rib spacing and a
few calcified granulomas at fixed places) that every image of the patient shares; an image adds
its own positioning shift, exposure, noise and findings. Images of one patient are therefore alike
in the way real follow-up images are, and images of two patients are not. Nothing here is real data.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")
CHEXPERT_FINDINGS = ("Cardiomegaly", "Lung Opacity", "Edema", "Pleural Effusion", "Atelectasis", "Support Devices")
PUBLIC_LAYOUTS = ("nih", "chexpert", "mimic")


def patient_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """What stays the same across one patient's images."""
    u = rng.uniform
    return {
        "body_rx": u(0.36, 0.47), "lung_dx": u(0.14, 0.24), "lung_rx": u(0.11, 0.17), "lung_ry": u(0.22, 0.34),
        "lung_cy": u(0.42, 0.52), "heart_cx": u(0.52, 0.63), "heart_r": u(0.09, 0.17), "spine_w": u(0.02, 0.05),
        "rib_gap": u(0.06, 0.095), "rib_bend": u(0.0, 0.25), "tissue": u(0.6, 0.8),
        "granulomas": [(0.5 + rng.choice([-1, 1]) * u(0.1, 0.28), u(0.25, 0.7), u(0.025, 0.045))
                       for _ in range(int(rng.integers(2, 5)))],
    }


def patient_xray(size: int, anatomy: dict[str, Any], rng: np.random.Generator, abnormal: bool = False) -> np.ndarray:
    """One float32 image in [0, 1] of the patient described by `anatomy`, with this image's own
    positioning (shift up to 3% of the side, a degree of tilt), exposure and noise."""
    a = anatomy
    shift_x, shift_y = rng.uniform(-0.03, 0.03, 2)
    tilt = math.radians(rng.uniform(-1.5, 1.5))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    xx, yy = xx - 0.5 - shift_x, yy - 0.5 - shift_y
    xx, yy = xx * math.cos(tilt) - yy * math.sin(tilt) + 0.5, xx * math.sin(tilt) + yy * math.cos(tilt) + 0.5
    img = np.full((size, size), 0.08, np.float32)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0

    img[ellipse(0.5, 0.55, a["body_rx"], 0.5)] = a["tissue"]
    for side in (-1, 1):
        img[ellipse(0.5 + side * a["lung_dx"], a["lung_cy"], a["lung_rx"], a["lung_ry"])] = 0.22
    img[ellipse(a["heart_cx"], 0.66, a["heart_r"], a["heart_r"] * 0.9)] = 0.62
    spine = np.abs(xx - 0.5) < a["spine_w"]
    img[spine] = np.maximum(img[spine], 0.82)
    for k in range(8):
        y0 = 0.2 + a["rib_gap"] * k
        img[(np.abs(yy - y0 - a["rib_bend"] * (xx - 0.5) ** 2) < 0.008) & (img < 0.5)] += 0.12
    for cx, cy, r in a["granulomas"]:
        img[ellipse(cx, cy, r, r)] = 0.95
    if abnormal:  # patchy opacities that differ from image to image
        for _ in range(int(rng.integers(2, 5))):
            cx, cy, r = 0.5 + rng.choice([-1, 1]) * rng.uniform(0.1, 0.25), rng.uniform(0.3, 0.6), rng.uniform(0.03, 0.07)
            img[ellipse(cx, cy, r, r)] = np.maximum(img[ellipse(cx, cy, r, r)], 0.55)
    img = img * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    padded = np.pad(img, 1, mode="edge")
    img = sum(padded[dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)) / 9.0
    return np.clip(img, 0, 1).astype(np.float32)


def _png(img: np.ndarray, path: Path, jpeg: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L")
    pil.save(path, **({"quality": 95} if jpeg else {}))


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _patients(n: int, per_patient: int, seed: int, layout: str) -> list[tuple[int, dict[str, Any], list[bool]]]:
    """(patient number, anatomy, per-image abnormal flags); n images in all, `per_patient` each (the last may have fewer)."""
    rng = np.random.default_rng([seed, PUBLIC_LAYOUTS.index(layout), 1])
    out = []
    for p in range(math.ceil(n / per_patient)):
        count = min(per_patient, n - p * per_patient)
        out.append((p + 1, patient_anatomy(rng), [bool((p + i) % 2) for i in range(count)]))
    return out


def fixture_patients(layout: str, n: int, per_patient: int = 3, seed: int = 0) -> dict[str, list[str]]:
    """Patient id -> the relpaths of its frontal images that `make_public_fixture` writes (ground truth for tests)."""
    out: dict[str, list[str]] = {}
    for p, _, flags in _patients(n, per_patient, seed, layout):
        pid, rels = _ids(layout, p)[0], []
        for i in range(len(flags)):
            rels.append(_relpath(layout, p, i))
        out[pid] = rels
    return out


def _ids(layout: str, p: int) -> tuple[str, str]:
    if layout == "nih":
        return str(p), f"{p:08d}"
    if layout == "chexpert":
        return f"patient{p:05d}", f"patient{p:05d}"
    subject = str(10000000 + p)
    return subject, subject


def _relpath(layout: str, p: int, i: int, lateral: bool = False) -> str:
    if layout == "nih":
        folder = "images_001" if p % 2 else "images_002"
        return f"{folder}/images/{p:08d}_{i + (1 if lateral else 0) * 100:03d}.png"
    if layout == "chexpert":
        return f"train/patient{p:05d}/study{i + 1}/view{2 if lateral else 1}_{'lateral' if lateral else 'frontal'}.jpg"
    subject = 10000000 + p
    study = 50000000 + p * 100 + i
    return f"files/p{str(subject)[:2]}/p{subject}/s{study}/{'lat' if lateral else 'img'}{p:04d}{i:02d}.jpg"


def make_public_fixture(out_dir: str | Path, layout: str, n: int = 8, size: int = 64, seed: int = 0,
                        per_patient: int = 3) -> Path:
    """Write `n` frontal images (`per_patient` per patient) plus one lateral image of the first patient
    (which readers leave out) in `layout`; returns the data set root."""
    out_dir = Path(out_dir)
    root = out_dir / {"nih": "ChestX-ray14", "chexpert": "CheXpert-v1.0-small", "mimic": "mimic-cxr-jpg"}[layout]
    rng = np.random.default_rng([seed, PUBLIC_LAYOUTS.index(layout), 2])
    rows: list[list[Any]] = []
    labels: list[list[Any]] = []
    people: list[list[Any]] = []
    for p, anatomy, flags in _patients(n, per_patient, seed, layout):
        sex = "M" if p % 2 else "F"
        age = int(rng.integers(20, 85))
        views = [(i, flag, False) for i, flag in enumerate(flags)] + ([(0, False, True)] if p == 1 else [])
        for i, abnormal, lateral in views:
            img = patient_xray(size, anatomy, rng, abnormal)
            rel = _relpath(layout, p, i, lateral)
            _png(img, root / rel, jpeg=layout != "nih")
            findings = [NIH_FINDINGS[(p + i) % len(NIH_FINDINGS)]] if abnormal else []
            if layout == "nih":
                rows.append([Path(rel).name, "|".join(findings) or "No Finding", i, p, age, sex,
                             "LL" if lateral else ("PA" if i % 2 == 0 else "AP"), size, size, 0.143, 0.143])
            elif layout == "chexpert":
                values = {name: "" for name in ("No Finding", *CHEXPERT_FINDINGS)}
                if abnormal:
                    values[CHEXPERT_FINDINGS[(p + i) % len(CHEXPERT_FINDINGS)]] = "1.0"
                    values[CHEXPERT_FINDINGS[(p + i + 1) % len(CHEXPERT_FINDINGS)]] = "-1.0"
                else:
                    values["No Finding"] = "1.0"
                    values["Cardiomegaly"] = "0.0"
                rows.append([f"{root.name}/{rel}", "Male" if sex == "M" else "Female", age,
                             "Lateral" if lateral else "Frontal", "" if lateral else "AP", *values.values()])
            else:
                subject, study = 10000000 + p, 50000000 + p * 100 + i
                rows.append([Path(rel).stem, subject, study, "CHEST (PA AND LAT)", "LATERAL" if lateral else "PA",
                             size, size])
                if not lateral:
                    values = ["1.0" if abnormal and name == CHEXPERT_FINDINGS[(p + i) % len(CHEXPERT_FINDINGS)] else
                              ("1.0" if not abnormal and name == "No Finding" else "") for name in ("No Finding", *CHEXPERT_FINDINGS)]
                    labels.append([subject, study, *values])
                    if i == 0:  # one report per patient: its impression becomes the caption
                        report = root / f"files/p{str(subject)[:2]}/p{subject}/s{study}.txt"
                        report.write_text("FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n FINDINGS: Lungs are clear.\n\n"
                                          f" IMPRESSION: No acute cardiopulmonary process{' ' + str(p) if p > 1 else ''}.\n")
        if layout == "mimic":
            people.append([10000000 + p, "M" if sex == "M" else "F", age])
    if layout == "nih":
        header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                  "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
        (root / "Data_Entry_2017_v2020.csv").write_text(_csv_text(header, rows))
    elif layout == "chexpert":
        header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *CHEXPERT_FINDINGS]
        (root / "train.csv").write_text(_csv_text(header, rows))
    else:
        header = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"]
        (root / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(gzip.compress(_csv_text(header, rows).encode()))
        (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(
            _csv_text(["subject_id", "study_id", "No Finding", *CHEXPERT_FINDINGS], labels))
        (root / "patients.csv").write_text(_csv_text(["subject_id", "gender", "anchor_age"], people))
    return root
