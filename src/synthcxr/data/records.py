"""The one record type every reader yields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NORMAL = "normal"
TUBERCULOSIS = "tuberculosis"


@dataclass
class XrayRecord:
    """One chest X-ray and what is known about its patient.

    `image_path` is set for file-based sources; `pixels` holds an already-decoded array for sources
    that need decoding with metadata (DICOM: windowed, MONOCHROME2, float32 in [0, 1]).
    `label` is the coarse class used for stratified splits and the downstream classifier
    ("normal" / "tuberculosis" for the TB sets); `finding` is the free-text reading.
    """

    image_path: Path | None
    patient_id: str
    source: str
    sex: str | None = None  # "male" | "female" | None
    age: float | None = None  # years; months/days converted
    finding: str | None = None
    label: str | None = None
    caption: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable identifier for manifests and caches."""
        return str(self.image_path) if self.image_path is not None else f"{self.source}:{self.patient_id}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pixels")
        d["image_path"] = str(self.image_path) if self.image_path is not None else None
        return d
