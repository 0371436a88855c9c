"""Image sets for evaluation: a plain folder, a `synthcxr generate` folder, or a native data set.

Every metric reads images through this module, so real and synthetic images are decoded and
resized the same way (clean-fid's lesson: a metric must not see a resize difference as a quality
difference). One decode path handles 8/16-bit grayscale, palette, RGBA and RGB files, and with the
run's `DecodedImageCache` (`read_decoded`) each file is decoded once however many metrics read it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from synthcxr.data.labels import LABELS  # noqa: F401 - the one label vocabulary (data layer)
from synthcxr.errors import DataError
from synthcxr.evaluate.imagecache import DecodedImageCache
from synthcxr.fileio import read_jsonl
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}
#: The one resize used for every feature extractor and pixel metric: PIL bicubic is antialiased
#: on downsampling (its filter support scales with the reduction), unlike torch's default bilinear.
RESIZE_METHOD = "PIL bicubic (antialiased), per channel on float32, clipped to 0..255 (clean-fid 'clean' mode)"


@dataclass
class ImageItem:
    """One image and what is known about it (label/sex come from a manifest or a data set)."""

    path: Path
    label: str | None = None
    sex: str | None = None
    patient_id: str | None = None
    key: str | None = None
    """The data layer's record id (`source/relpath`), by which a saved split names the image."""


@dataclass
class ImageSet:
    """The images of one role (real, fake, train, test) and where they came from."""

    root: Path
    kind: str  # "folder" | "generation" | "dataset"
    items: list[ImageItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[Path]:
        return [it.path for it in self.items]

    def describe(self) -> dict:
        labels: dict[str, int] = {}
        for it in self.items:
            if it.label is not None:
                labels[it.label] = labels.get(it.label, 0) + 1
        return {"path": str(self.root), "kind": self.kind, "n_images": len(self.items), "labels": labels}


def _folder_label(path: Path, root: Path) -> str | None:
    """ImageFolder convention: a parent folder named by a label (`normal/`, `Tuberculosis/`, `TB/`) gives it."""
    from synthcxr.data.labels import known_label

    for part in path.relative_to(root).parts[:-1]:
        if (label := known_label(part)) is not None and not part.isdigit():
            return label
    return None


def _native_label(path: Path) -> str | None:
    """Montgomery/Shenzhen file names end in _0 (normal) or _1 (tuberculosis)."""
    stem = path.stem
    if stem.endswith("_0"):
        return "normal"
    if stem.endswith("_1"):
        return "tuberculosis"
    return None


def _list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _read_generation(root: Path) -> ImageSet:
    from synthcxr.data.labels import label_from_finding, parse_label

    manifest = root / "manifest.jsonl"
    rows = read_jsonl(manifest)
    items: list[ImageItem] = []
    missing: list[str] = []
    for line, row in enumerate(rows, start=1):
        if "file" not in row:
            continue
        path = root / row["file"]
        if not path.is_file():
            missing.append(row["file"])
            continue
        label = parse_label(row.get("label"), file=manifest, where=f"row {line} ({row['file']})")
        label = label or label_from_finding(row.get("finding"))  # finding-only prompts still say the class
        items.append(ImageItem(path=path, label=label, sex=row.get("sex"), patient_id=path.stem))
    if missing:
        log.warning("%s: %d image(s) listed in manifest.jsonl are missing (e.g. %s); evaluating the rest", root, len(missing), missing[0])
    return ImageSet(root=root, kind="generation", items=items)


def _is_native_layout(root: Path) -> bool:
    """Montgomery/Shenzhen (`CXR_png/`) or a data-layer folder with `manifest.csv`: read by `synthcxr.data`."""
    return (root / "CXR_png").is_dir() or any(p.is_dir() for p in root.glob("*/CXR_png")) or (root / "manifest.csv").is_file()


def _read_native(root: Path) -> ImageSet:
    """Montgomery/Shenzhen layout: use the data layer when present (it also reads sex), else file names."""
    try:
        from synthcxr.data.config import DataConfig
        from synthcxr.data.dataset import load_records
        from synthcxr.data.splits import record_id
    except ImportError:  # data layer not installed in this build: fall back to file-name labels
        load_records = None
    if load_records is not None:
        records = load_records(DataConfig(path=root))
        items = [
            ImageItem(path=Path(r.image_path), label=r.label, sex=r.sex, patient_id=r.patient_id, key=record_id(r))
            for r in records
            if r.image_path is not None
        ]
        if items:
            return ImageSet(root=root, kind="dataset", items=items)
    paths = [p for p in _list_images(root) if "CXR_png" in p.parts]
    items = [ImageItem(path=p, label=_native_label(p), patient_id=p.stem.rsplit("_", 1)[0]) for p in paths]
    return ImageSet(root=root, kind="dataset", items=items)


def read_image_set(path: str | Path, role: str) -> ImageSet:
    """Find the images of one role; raise a clear error when there are none."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{role} image folder does not exist", file=root, fix=f"check the --{role} path")
    if root.is_file():
        raise DataError(f"{role} must be a folder of images, not a file", file=root, fix=f"pass the folder that holds the images as --{role}")
    if (root / "manifest.jsonl").is_file():
        image_set = _read_generation(root)
    elif _is_native_layout(root):
        image_set = _read_native(root)
    else:
        paths = _list_images(root)
        image_set = ImageSet(
            root=root,
            kind="folder",
            items=[ImageItem(path=p, label=_folder_label(p, root), patient_id=p.stem,
                             key=f"folder/{p.relative_to(root).as_posix()}") for p in paths],
        )
    if not image_set.items:
        raise DataError(
            f"no PNG/JPEG/DICOM images found for {role}",
            file=root,
            fix=f"point --{role} at a folder with .png/.jpg/.dcm images (searched recursively), a generation folder with manifest.jsonl, or a Montgomery/Shenzhen data set",
        )
    return image_set


def decode_image(data: bytes, source: str | Path = "<bytes>") -> np.ndarray:
    """Bytes -> H x W x 3 uint8 RGB.

    8-bit files go through PIL's `convert("RGB")` exactly as clean-fid does, so both give identical
    pixels, except that alpha follows the data layer's one rule (`data.preprocess.flatten_alpha`:
    composited over black, as the model was trained) where clean-fid drops it. High-bit-depth
    grayscale (16-bit PNG, 12-bit data in 16-bit containers, float TIFF) and DICOM are scaled to
    0..255 by the data layer's rules (`synthcxr.data`) instead of being clipped. A JPEG's EXIF
    orientation is applied, as in training (clean-fid ignores it; only tagged JPEGs differ).
    """
    try:
        if data[128:132] == b"DICM":
            import pydicom

            from synthcxr.data.dicom import dicom_to_float

            gray = dicom_to_float(Path(source), ds=pydicom.dcmread(io.BytesIO(data)))
            return _gray_to_rgb(gray)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format == "JPEG":  # upright, as the data layer trains on it (no-op without the tag)
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                from synthcxr.data.preprocess import to_grayscale

                return _gray_to_rgb(np.asarray(to_grayscale(img), dtype=np.float32))
            from synthcxr.data.preprocess import flatten_alpha

            return np.asarray(flatten_alpha(img).convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, AttributeError, KeyError) as exc:
        raise DataError(f"cannot read image: {exc}", file=source, fix="re-export the file as PNG/JPEG or remove it") from exc


def _gray_to_rgb(gray01: np.ndarray) -> np.ndarray:
    """Float grayscale in [0, 1] -> H x W x 3 uint8."""
    gray = np.clip(np.rint(np.nan_to_num(gray01) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def compact(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> H x W when the channels are equal (grayscale files), else unchanged.

    Lossless: `resize_rgb` gives the same output for both forms, so the decoded-image cache can keep
    a third of the bytes for grayscale X-rays.
    """
    if rgb.ndim == 3 and (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all():
        return np.ascontiguousarray(rgb[:, :, 0])
    return rgb


def _decode_file(path: Path) -> np.ndarray:
    return compact(decode_image(Path(path).read_bytes(), path))


def read_decoded(path: str | Path, images: DecodedImageCache | None = None) -> np.ndarray:
    """A file's decoded pixels (`compact` form, H x W or H x W x 3 uint8), via the run's cache when given.

    Every metric reads pixels through here, so with a cache each file is decoded once per run.
    Raises OSError when the file cannot be read and DataError when it cannot be decoded.
    """
    if images is None:
        return _decode_file(Path(path))
    return images.get(path, _decode_file)


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """H x W x 3 (or H x W grayscale) uint8 -> size x size x 3 float32 in 0..255, the one documented resize (RESIZE_METHOD)."""
    h, w = rgb.shape[:2]
    if rgb.ndim == 2:
        is_gray, rgb = True, rgb[:, :, None]
    else:
        is_gray = bool((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all())
    if (h, w) == (size, size):
        return np.repeat(rgb, 3, axis=2).astype(np.float32) if rgb.shape[2] == 1 else rgb.astype(np.float32)
    channels = [0] if is_gray else [0, 1, 2]
    out = []
    for c in channels:
        img = Image.fromarray(rgb[:, :, c].astype(np.float32))
        out.append(np.asarray(img.resize((size, size), resample=Image.BICUBIC)).clip(0, 255))
    if is_gray:  # identical channels resize identically: do the work once
        out = out * 3
    return np.stack(out, axis=2).astype(np.float32)


def load_gray(path: str | Path, size: int, images: DecodedImageCache | None = None) -> np.ndarray:
    """An image as a size x size float32 array in [0, 1] (for SSIM, pairs and the classifier)."""
    resized = resize_rgb(read_decoded(path, images), size)
    return (resized.mean(axis=2) / 255.0).astype(np.float32)


def load_gray_stack(paths: list[Path], size: int, images: DecodedImageCache | None = None) -> np.ndarray:
    """N x size x size float32 in [0, 1]."""
    if not paths:
        return np.zeros((0, size, size), dtype=np.float32)
    return np.stack([load_gray(p, size, images) for p in paths])
