"""DICOM pixels -> float32 in [0, 1], displayed the way a radiologist's viewer would show them.

Order matters and follows PS3.3 C.11: stored values -> modality LUT (rescale slope/intercept) ->
VOI LUT or window centre/width -> presentation (MONOCHROME1 is inverted so bone is always bright).
The [0, 1] scaling uses the nominal output range of each step (e.g. 0..4095 for 12 bits stored),
never the image's own min/max, so intensities stay comparable across images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: the 'DICM' magic at byte 128 (extension optional, as on many PACS exports)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _stored_range(ds) -> tuple[float, float]:  # noqa: ANN001 - pydicom Dataset
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _modality_range(ds) -> tuple[float, float]:  # noqa: ANN001
    """Range of values after the modality LUT (as pydicom's apply_windowing assumes)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = _stored_range(ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return lo * slope + intercept, hi * slope + intercept


def read_dicom_meta(path: Path):  # noqa: ANN201 - pydicom Dataset
    """Header only (fast); raises pydicom's errors on files that are not DICOM."""
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def dicom_to_float(path: Path, ds=None) -> np.ndarray:  # noqa: ANN001
    """Decode one single-frame DICOM image to float32 HxW in [0, 1], MONOCHROME2 (bright = dense)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if ds is None or "PixelData" not in ds:
        ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("no pixel data (a truncated file, or a DICOM without an image such as a report)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # projection radiographs are single-frame; take the first of a multi-frame object
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # colour secondary captures: luminance, scaled by bit depth
        if arr.ndim == 3:
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        lo, hi = _stored_range(ds)
        return np.clip((arr.astype(np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)

    values = apply_modality_lut(arr, ds)
    has_voi_lut = bool(ds.get("VOILUTSequence"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_voi_lut:
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        lo, hi = 0.0, float(2**lut_bits - 1)
        if not np.issubdtype(values.dtype, np.integer):
            values = np.round(values).astype(np.int64)
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    elif has_window:
        lo, hi = _modality_range(ds)
        values = apply_voi_lut(values, ds, index=0, prefer_lut=False)
    else:
        lo, hi = _modality_range(ds)
    out = (np.asarray(values, dtype=np.float64) - lo) / (hi - lo)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out
