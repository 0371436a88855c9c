"""Per-image checks shared by `data inspect` and `load_records`: decodable images, duplicate content.

A truncated or corrupt image found mid-training wastes hours; a duplicate image can land in both the
training and the test split and inflate every metric. Both are caught here, before any work, and
reported together with every other problem.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from synthcxr.data.records import XrayRecord
from synthcxr.errors import Problem
from synthcxr.fileio import sha256_file
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)


def check_image(path: Path, full: bool = True) -> str | None:
    """None when the file decodes; else what is wrong. `full=False` checks PNG CRCs without decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if not full and img.format == "PNG":
                    img.verify()  # reads every chunk and checks its CRC: catches truncation and bit rot
                else:
                    img.load()
                    if img.width < 2 or img.height < 2:
                        return f"image is only {img.width}x{img.height} pixels"
    except FileNotFoundError:
        return "file not found"
    except Image.UnidentifiedImageError:
        return "not an image (content is not PNG/JPEG/TIFF/BMP, whatever the extension)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower() or "end of file" in text.lower() or "eof" in text.lower():
            return f"truncated image ({text})"
        return f"corrupt image ({text})"
    return None


def file_hash(record: XrayRecord) -> str | None:
    """Content hash: the DICOM pixel data hash when the reader stored one, else the file bytes."""
    if record.extra.get("sha256"):
        return str(record.extra["sha256"])
    if record.image_path is None:
        return None
    return sha256_file(record.image_path)


def check_records(records: list[XrayRecord], full: bool = True, show_progress: bool | None = None) -> tuple[list[XrayRecord], list[Problem]]:
    """(records that passed, problems): decode every image and find duplicates by content hash.

    Duplicates keep their first occurrence (in path order) and report the later copies.
    """
    good: list[XrayRecord] = []
    problems: list[Problem] = []
    seen: dict[str, XrayRecord] = {}
    show = len(records) > 200 if show_progress is None else show_progress
    fix_corrupt = "re-copy or re-export the image from its source, or remove it"

    def one(record: XrayRecord) -> None:
        if record.pixels is None and record.image_path is not None and record.extra.get("format") != "dicom":
            error = check_image(Path(record.image_path), full=full)
            if error:
                problems.append(Problem(record.image_path, error, fix_corrupt))
                return
        digest = file_hash(record)
        if digest is not None:
            record.extra.setdefault("sha256", digest)
            if digest in seen:
                first = seen[digest]
                problems.append(Problem(record.image_path or record.key, f"duplicate image: same content as {first.image_path or first.key}",
                                        "remove one copy (duplicates can leak between train and test splits)"))
                return
            seen[digest] = record
        good.append(record)

    if show:
        with progress_bar(len(records), "checking images") as (progress, task):
            for record in records:
                one(record)
                progress.advance(task)
    else:
        for record in records:
            one(record)
    return good, problems


def check_scan(scan, full: bool) -> tuple[list[XrayRecord], list[Problem]]:  # noqa: ANN001 - readers.ScanResult
    """Check the pixels of every image a scan saw, including those left out for metadata problems,
    so one pass lists every problem; only the scan's usable records are returned."""
    checked, image_problems = check_records(scan.records + scan.image_only, full=full)
    usable = {id(record) for record in scan.records}
    return [record for record in checked if id(record) in usable], scan.problems + image_problems
