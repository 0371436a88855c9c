"""Helpers for reader-study tests: generated image folders and HTML scraping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def _xray_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Noise plus two dark ellipses ('lungs'): enough structure to tell images apart."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.6 + 0.1 * rng.standard_normal((h, w))
    for cx in (0.3, 0.7):
        inside = ((xx / w - cx) / 0.17) ** 2 + ((yy / h - 0.5) / 0.33) ** 2 < 1
        img[inside] -= 0.35 + 0.1 * rng.random()
    return np.clip(img, 0, 1)


def make_real_folder(root: Path, n: int = 6, seed: int = 1) -> Path:
    """Shenzhen-like layout: CXR_png/CHNCXR_####_<label>.png, non-square, 8-bit grayscale, with a
    text chunk, plus a mask folder that must be ignored."""
    rng = np.random.default_rng(seed)
    png_dir = root / "CXR_png"
    png_dir.mkdir(parents=True)
    for i in range(n):
        arr = (_xray_like(rng, 90, 76) * 255).astype(np.uint8)
        info = PngImagePlugin.PngInfo()
        info.add_text("Source", "hospital scanner")
        Image.fromarray(arr, mode="L").save(png_dir / f"CHNCXR_{i + 1:04d}_{i % 2}.png", pnginfo=info)
    (root / "ManualMask").mkdir()
    Image.fromarray(np.zeros((90, 76), np.uint8)).save(root / "ManualMask" / "CHNCXR_0001_0_mask.png")
    return root


def make_model_folder(root: Path, model: str, n: int = 6, seed: int = 2, size: int = 64) -> Path:
    """Looks like `synthcxr generate` output: RGB PNGs with generation text chunks + manifest.jsonl."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        arr = (_xray_like(rng, size, size) * 255).astype(np.uint8)
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"a chest x-ray, model={model}, seed={i}")
        info.add_text("synthcxr", json.dumps({"model": model}))
        file = f"{i:05d}.png"
        Image.fromarray(np.stack([arr] * 3, axis=-1), mode="RGB").save(root / file, pnginfo=info)
        label = "tuberculosis" if i % 2 else "normal"
        rows.append({"file": file, "prompt": f"chest x-ray, {label}", "seed": i, "model": model, "label": label})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_image_folder(root: Path, n: int, size: int, seed: int, manifest: bool = False) -> Path:
    """`n` square x-ray-like 8-bit PNGs of `size` px (with a manifest.jsonl when `manifest`): two
    folders made with the same `size` differ only by chance, one with a smaller `size` must be enlarged."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((_xray_like(rng, size, size) * 255).astype(np.uint8), mode="L").save(root / f"{i:05d}.png")
    if manifest:
        (root / "manifest.jsonl").write_text("".join(json.dumps({"file": f"{i:05d}.png"}) + "\n" for i in range(n)))
    return root


CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
TASK_RE = re.compile(r'action="/read/answer/([^"]+)"')


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "page has no CSRF token"
    return match.group(1)


def task_of(html: str) -> str | None:
    match = TASK_RE.search(html)
    return match.group(1) if match else None


def invite_path(link: str) -> str:
    return link.replace("http://testserver", "")


FULL_ANSWER = {"realism": "4", "choice": "real", "confidence": "2", "finding": "normal", "comment": "", "elapsed_ms": "1234"}


def sign_in_reader(client, link: str) -> str:
    """Open an invite link and press Start; returns the first /read page."""
    page = client.get(invite_path(link))
    assert page.status_code == 200, page.text
    resp = client.post(invite_path(link), data={"csrf_token": csrf_of(page.text)})
    assert resp.status_code == 200 and ("Image 1 of" in resp.text or "Pair 1 of" in resp.text), resp.text[:500]
    return resp.text


def sign_in_admin(client, token: str) -> None:
    page = client.get("/admin/login")
    resp = client.post("/admin/login", data={"csrf_token": csrf_of(page.text), "token": token})
    assert resp.status_code == 200 and "Studies" in resp.text


def run_cli(argv: list[str], capsys) -> str:  # noqa: ANN001 - pytest's capsys
    """Run `synthcxr` in-process; fail with its output unless it exits 0; return stdout."""
    from synthcxr.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr()
    return capsys.readouterr().out
