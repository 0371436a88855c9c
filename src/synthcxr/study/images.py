"""Find study images and pass every one, real or synthetic, through the same blinding pipeline.

Why one pipeline: any difference a reader (or their browser) could notice between real and
synthetic files would unblind the study. So every image is decoded, converted to 8-bit grayscale,
centre-cropped to a square, resized to the study size with the same filter, and written as a PNG
with fixed encoder settings and no metadata chunks. The PNG is stored *uncompressed* (zlib level
0): then every file of a study has exactly the same byte length, so not even the Content-Length
(or how well an image compresses) hints at its source.

What one pipeline cannot hide is what the sources themselves differ in (an enlarged small image is
blurrier, padded images have bars): `study create` therefore records each group's sizes and
framing, refuses enlargement unless asked, and measures the rest with `leakcheck`.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from synthcxr.data.labels import parse_label
from synthcxr.data.readings import parse_sex
from synthcxr.errors import DataError
from synthcxr.fileio import read_jsonl
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"}
# Montgomery / Shenzhen file names end in _0 (normal) or _1 (tuberculosis).
_NIH_LABEL = re.compile(r"^(?:MCUCXR|CHNCXR)_\d+_([01])$", re.IGNORECASE)


@dataclass(frozen=True)
class SourceImage:
    """One candidate image before blinding."""

    path: Path
    group: str  # model name, or "real"
    source: str  # "real" | "synthetic"
    label: str | None = None
    prompt: str | None = None
    sex: str | None = None
    """'male' / 'female' where known (manifest column, or a public set's clinical readings); pairs match on it."""


def _label_from_name(path: Path) -> str | None:
    match = _NIH_LABEL.match(path.stem)
    if match:
        return "tuberculosis" if match.group(1) == "1" else "normal"
    return None


def _from_manifest(manifest: Path, group: str, source: str) -> list[SourceImage]:
    rows = list({row.get("file"): row for row in read_jsonl(manifest)}.values())  # a repeated line: last wins
    images = []
    for i, row in enumerate(rows):
        file = row.get("file")
        if not file:
            raise DataError(f"row {i + 1} has no 'file'", file=manifest, fix="every manifest row needs a 'file' key")
        path = (manifest.parent / file).resolve()
        if not path.is_file():
            raise DataError(f"row {i + 1} names {file}, which does not exist", file=manifest,
                            fix="regenerate the images or remove the row")
        label = parse_label(row.get("label"), file=manifest, where=f"row {i + 1}") or _label_from_name(path)
        images.append(SourceImage(path, group, source, label, row.get("prompt"), parse_sex(row.get("sex"))))
    return images


def _find_manifest(folder: Path) -> Path | None:
    """A generation folder has manifest.jsonl; a run directory has it in a subfolder (e.g. generated/)."""
    if (folder / "manifest.jsonl").is_file():
        return folder / "manifest.jsonl"
    found = sorted(folder.rglob("manifest.jsonl"), key=lambda p: (len(p.parts), str(p)))
    if len(found) > 1:
        log.warning("%s holds %d generation folders; using %s (pass that folder itself to choose another)",
                    folder, len(found), found[0].parent)
    return found[0] if found else None


def _image_files(folder: Path) -> list[Path]:
    root = folder / "CXR_png" if (folder / "CXR_png").is_dir() else folder
    files = [
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any("mask" in part.lower() for part in p.relative_to(root).parts)
    ]
    return sorted(files)


def collect_real(path: Path) -> list[SourceImage]:
    """Real control images: a manifest folder, a Montgomery/Shenzhen folder, or any image folder."""
    path = Path(path)
    if not path.exists():
        raise DataError("real image folder not found", file=path, fix="pass --real with an existing folder")
    if path.is_file():
        return [SourceImage(path, "real", "real", _label_from_name(path))]
    manifest = path / "manifest.jsonl"
    if manifest.is_file():
        return [SourceImage(i.path, "real", "real", i.label, None, i.sex) for i in _from_manifest(manifest, "real", "real")]
    files = _image_files(path)
    if not files:
        raise DataError("no images found", file=path, fix=f"the folder needs image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    sexes = _sex_from_readings(path)
    return [SourceImage(p, "real", "real", _label_from_name(p), None, sexes.get(p.resolve())) for p in files]


def _sex_from_readings(path: Path) -> dict[Path, str]:
    """Sex per image from a Montgomery/Shenzhen set's ClinicalReadings (empty when there are none or
    they cannot be read: sex only refines the pairing of a paired study)."""
    if not any(path.glob("ClinicalReadings")) and not any(path.glob("*/ClinicalReadings")):
        return {}
    from synthcxr.data.readers import scan_paths

    try:
        result = scan_paths([path], keep_pixels=False)
    except Exception as exc:  # noqa: BLE001 - optional information; the study works without it
        log.debug("no sex from clinical readings in %s: %s", path, exc)
        return {}
    return {Path(r.image_path).resolve(): r.sex for r in result.records if r.sex}


def collect_model(path: Path, group: str) -> list[SourceImage]:
    """Synthetic images of one model: a generation folder or a run directory holding one."""
    path = Path(path)
    if not path.is_dir():
        raise DataError("model image folder not found", file=path,
                        fix="pass --model with a run directory or a folder written by `synthcxr generate`")
    manifest = _find_manifest(path)
    if manifest is not None:
        return _from_manifest(manifest, group, "synthetic")
    files = _image_files(path)
    if not files:
        raise DataError("no generated images found (no manifest.jsonl and no image files)", file=path,
                        fix="run `synthcxr generate` for this model first, or point --model at its output folder")
    return [SourceImage(p, group, "synthetic") for p in files]


def _decode(path: Path) -> np.ndarray:
    """Any supported file -> float array in [0, 1], single channel."""
    if path.suffix.lower() == ".dcm":
        import pydicom
        from pydicom.pixels import apply_voi_lut

        ds = pydicom.dcmread(path)
        arr = apply_voi_lut(ds.pixel_array, ds).astype(np.float64)
        if arr.ndim == 3:
            arr = arr.mean(axis=-1)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            arr = arr.max() - arr
    else:
        with PILImage.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
            else:
                arr = np.asarray(img.convert("L"), dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype != np.uint8 and hi > 255:  # 16-bit data: stretch to the full range
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr / 255.0


def source_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels."""
    try:
        if Path(path).suffix.lower() == ".dcm":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        with PILImage.open(path) as img:
            return img.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(f"cannot read image: {exc}", file=path, fix="remove or replace the broken file") from None


@dataclass(frozen=True)
class Blinded:
    """One image after the pipeline, with what the study records about its framing."""

    data: bytes
    """The bare PNG readers are served."""
    bars: float
    """Widest uniform band along one edge of the centre square, as a fraction of its side (padding
    such as `data.resize: pad` leaves bars that real images do not have)."""


def edge_bars(arr: np.ndarray, tolerance: float = 2 / 255) -> float:
    """Fraction of the side covered by the widest run of uniform rows/columns at any edge."""
    side = min(arr.shape[:2])
    widest = 0
    for edge in (arr, arr[::-1], arr.T, arr.T[::-1]):  # top, bottom, left, right: rows from the edge inwards
        uniform = edge.std(axis=1) <= tolerance
        run = int(np.argmin(uniform)) if not uniform.all() else len(uniform)
        widest = max(widest, run)
    return widest / side if side else 0.0


def blind(path: Path, size: int) -> Blinded:
    """The one pipeline: decode -> grayscale -> centre square crop -> size x size -> bare PNG."""
    try:
        arr = _decode(Path(path))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(f"cannot read image: {exc}", file=path, fix="remove or replace the broken file") from None
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    arr = arr[top:top + side, left:left + side]
    img = PILImage.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8))
    if side != size:
        img = img.resize((size, size), PILImage.Resampling.LANCZOS)
    return Blinded(encode_png(img), edge_bars(arr))


def blind_png(path: Path, size: int) -> bytes:
    """`blind`, bytes only."""
    return blind(path, size).data


def dither_png(data: bytes, seed: bytes) -> bytes:
    """The same picture with every pixel moved by -1, 0 or +1 grey level (clipped to 0..255), drawn
    from `seed`: invisible, yet two tasks showing one image (a repeat, or two readers) never get
    byte-identical files. Length, format and chunks stay those of `encode_png`."""
    with PILImage.open(io.BytesIO(data)) as img:
        arr = np.asarray(img, dtype=np.int16)
    rng = np.random.default_rng(list(np.frombuffer(seed, dtype=np.uint32)))
    noise = rng.integers(-1, 2, size=arr.shape, dtype=np.int16)
    return encode_png(PILImage.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8)))


def encode_png(img: PILImage.Image) -> bytes:
    """Fixed encoder settings; Pillow writes no text/time chunks unless given pnginfo, so only
    IHDR/IDAT/IEND remain (checked by `png_chunks`)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=0, optimize=False)
    return buf.getvalue()


def png_chunks(data: bytes) -> list[str]:
    """Chunk types of a PNG file, in order (used to prove no metadata survives)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8].decode("latin-1")
        chunks.append(ctype)
        crc = int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big")
        if zlib.crc32(data[pos + 4:pos + 8 + length]) != crc:
            raise ValueError(f"bad CRC in {ctype}")
        pos += 12 + length
    return chunks
