"""Any chest X-ray file -> the square 3-channel image Stable Diffusion's VAE expects.

8-bit and 16-bit grayscale, RGB(A), palette and float TIFF inputs all become one grayscale
image first (X-rays carry no colour; RGB files are usually three identical channels), are resized
with antialiasing so the shorter (crop) or longer (pad) side matches the resolution, centre-cropped
or padded with black, and repeated to 3 channels. There is deliberately no flip here: chest X-rays
have laterality, so flipping is an opt-in augmentation in the dataset.

Alpha (RGBA, LA, PA, palette with a transparent entry) follows one rule, `flatten_alpha`, which the
evaluation decoder uses too: the image is composited over opaque black, i.e. each value becomes
value x alpha / 255, so a transparent pixel reads as no signal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps

from synthcxr.data.dicom import DICOM_SUFFIXES, dicom_to_float, is_dicom_file
from synthcxr.data.records import XrayRecord

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
ResizeMode = Literal["crop", "pad"]


def _high_bit_scale(arr: np.ndarray) -> float:
    """Full-scale value of a >8-bit image: 12-bit data is often stored in 16-bit containers.

    PNG/TIFF rarely record the significant bits, so use the smallest common depth (10, 12, 14, 16
    bits) holding the image maximum; a 12-bit X-ray then fills [0, 1] instead of looking black.
    """
    peak = float(arr.max()) if arr.size else 0.0
    for bits in (10, 12, 14, 16):
        if peak <= 2**bits - 1:
            return float(2**bits - 1)
    return float(max(peak, 1.0))


def to_grayscale(img: Image.Image) -> Image.Image:
    """Any PIL image -> mode 'L' (8-bit) or 'F' (float in [0, 1] for >8-bit inputs)."""
    img = ImageOps.exif_transpose(img) if img.format == "JPEG" else img
    mode = img.mode
    if mode == "L":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        if mode == "I" and arr.min() < 0:
            arr -= arr.min()
        return Image.fromarray(arr / _high_bit_scale(arr), mode="F")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo < 0 or hi > 1:  # not already normalised: use its own range
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.nan_to_num(arr).astype(np.float32), mode="F")
    return flatten_alpha(img).convert("L")  # RGB(A), LA, P(A), 1, CMYK, YCbCr


ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def flatten_alpha(img: Image.Image) -> Image.Image:
    """The one alpha rule, for training and evaluation alike: composite over opaque black.

    Each value becomes value x alpha / 255 (PIL's integer rounding), so a transparent pixel reads as
    black, the "no signal" of a MONOCHROME2 X-ray, rather than as whatever colour it hides. Returns
    an RGB image for inputs with alpha (RGBA, LA, PA, palette with a transparent entry) and the same
    image, untouched, otherwise.
    """
    if img.mode not in ALPHA_MODES and not (img.mode == "P" and "transparency" in img.info):
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def read_gray(path: Path) -> Image.Image:
    """Decode an image or DICOM file to grayscale ('L' or 'F'); raises on corrupt files."""
    if path.suffix.lower() in DICOM_SUFFIXES or (path.suffix.lower() not in IMAGE_SUFFIXES and is_dicom_file(path)):
        return Image.fromarray(dicom_to_float(path), mode="F")
    with Image.open(path) as img:
        img.load()
        return to_grayscale(img)


def gray_from_pixels(pixels: np.ndarray) -> Image.Image:
    """A record's decoded array (float in [0, 1], or uint8/uint16) as a grayscale PIL image."""
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[-1] == 4 and arr.dtype == np.uint8:
        return to_grayscale(Image.fromarray(arr, mode="RGBA"))  # the one alpha rule (flatten_alpha)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1) if arr.shape[-1] in (3, 4) else arr[0]
    if arr.dtype == np.uint8:
        return Image.fromarray(arr, mode="L")
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / _high_bit_scale(arr)
    return Image.fromarray(np.clip(arr.astype(np.float32), 0, 1), mode="F")


def fit_square(img: Image.Image, resolution: int, resize: ResizeMode = "crop") -> Image.Image:
    """Antialiased resize, then centre crop (`crop`) or centre pad with black (`pad`) to a square."""
    w, h = img.size
    scale = resolution / (min(w, h) if resize == "crop" else max(w, h))
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if resize == "crop":
        new = (max(new[0], resolution), max(new[1], resolution))
    img = img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0 if img.mode == "L" else None)
    if resize == "crop":
        left, top = (new[0] - resolution) // 2, (new[1] - resolution) // 2
        return img.crop((left, top, left + resolution, top + resolution))
    canvas = Image.new(img.mode, (resolution, resolution), 0)
    canvas.paste(img, ((resolution - new[0]) // 2, (resolution - new[1]) // 2))
    return canvas


def _to_8bit(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img
    arr = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
    return Image.fromarray(np.round(arr * 255).astype(np.uint8), mode="L")


def load_image(record_or_path: XrayRecord | str | Path, resolution: int = 512, resize: ResizeMode = "crop") -> Image.Image:
    """The model-ready image: RGB, `resolution` x `resolution`, three identical channels."""
    if isinstance(record_or_path, XrayRecord):
        if record_or_path.pixels is not None:
            gray = gray_from_pixels(record_or_path.pixels)
        elif record_or_path.image_path is not None:
            gray = read_gray(Path(record_or_path.image_path))
        else:
            raise ValueError(f"record {record_or_path.key} has neither pixels nor an image path")
    else:
        gray = read_gray(Path(record_or_path))
    gray = _to_8bit(fit_square(gray, resolution, resize))
    return Image.merge("RGB", (gray, gray, gray))


def to_model_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor 3xHxW in [-1, 1] (the VAE's input range)."""
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)
