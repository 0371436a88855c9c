"""A per-run cache of decoded images, so one `synthcxr evaluate` decodes each file once.

Features, MS-SSIM diversity, memorization SSIM and the classifier each need the same files at a
different size. Decoding a large PNG/DICOM costs more than resizing it, so the decoded pixels are
kept at native size and every metric still does its own documented resize (`images.RESIZE_METHOD`)
from them: the numbers are bit-for-bit those of decoding again.

What is kept is the decoder's output in its compact exact form: H x W uint8 when the three channels
are equal (every grayscale X-ray), H x W x 3 uint8 otherwise. Keeping uint8 rather than float
grayscale is 4x smaller and loses nothing (colour files keep their channels, which the feature
extractors see). Entries are keyed by (absolute path, mtime_ns, size), so a file rewritten during a
run is decoded again, and evicted least-recently-used beyond a byte budget, so a set larger than
the budget costs no more than not caching. Arrays handed out are read-only: callers share them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Key = tuple[str, int, int]


def file_key(path: str | Path) -> Key:
    """(absolute path, mtime_ns, size): changes whenever the file is replaced or rewritten."""
    st = os.stat(path)
    return (os.fspath(Path(path).absolute()), st.st_mtime_ns, st.st_size)


class DecodedImageCache:
    """Thread-safe LRU of decoded images with a byte budget (feature extraction decodes in threads)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.peak_bytes = 0
        self.decodes = 0  # files decoded (misses), so the one-decode-per-file promise is observable
        self.hits = 0
        self.evictions = 0

    def get(self, path: str | Path, decode: Callable[[Path], np.ndarray]) -> np.ndarray:
        """The decoded image of `path`, calling `decode(path)` only when it is not cached."""
        key = file_key(path)
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return arr
        arr = decode(Path(path))  # outside the lock: decodes of different files run in parallel
        arr.setflags(write=False)
        with self._lock:
            self.decodes += 1
            if key not in self._items and arr.nbytes <= self.max_bytes:
                self._items[key] = arr
                self.bytes += arr.nbytes
                while self.bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= old.nbytes
                    self.evictions += 1
                self.peak_bytes = max(self.peak_bytes, self.bytes)
        return arr

    def stats(self) -> dict[str, Any]:
        return {"max_mb": self.max_bytes / 2**20, "decodes": self.decodes, "hits": self.hits,
                "evictions": self.evictions, "peak_mb": round(self.peak_bytes / 2**20, 2)}
