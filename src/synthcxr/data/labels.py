"""The label vocabulary: every accepted spelling of the two classes, mapped to one name.

Generate (prompts CSV), evaluate (generation manifests, folder names, data sets) and the study
read labels through here, so "Normal", "TB" or "1" mean the same everywhere. Where a label decides
which images a classifier sees, an unknown one is an error naming the file and the accepted
spellings (`parse_label`): before, "Tuberculosis" silently dropped every synthetic image from the
utility check. The data layer's own reader stays lenient (`normalize_label` keeps other labels,
lower-cased) because captions may carry labels of other data sets.
"""

from __future__ import annotations

import re
from pathlib import Path

from synthcxr.data.records import NORMAL, TUBERCULOSIS
from synthcxr.errors import DataError

LABELS: tuple[str, str] = (NORMAL, TUBERCULOSIS)
"""The two classes, negative first (the classifier's 0 and 1)."""

ALIASES: dict[str, str] = {
    "0": NORMAL, "normal": NORMAL, "negative": NORMAL, "healthy": NORMAL, "no finding": NORMAL,
    "1": TUBERCULOSIS, "tb": TUBERCULOSIS, "tuberculosis": TUBERCULOSIS, "ptb": TUBERCULOSIS,
    "stb": TUBERCULOSIS, "positive": TUBERCULOSIS,
}
"""Accepted spellings (compared case-insensitively, whitespace collapsed)."""

# words in a free-text finding that say tuberculosis ("STB, ATB", "pulmonary tuberculosis", "TB pleuritis")
_TB_WORDS = re.compile(r"(?<![a-z])(tuberculosis|tuberculous|tb|ptb|stb|atb)(?![a-z])", re.I)


def _key(value: object) -> str:
    return re.sub(r"\s+", " ", str(value)).strip().lower()


def accepted_text() -> str:
    """Human list of the accepted spellings, for error messages and docs."""
    return "; ".join(f"{name}: " + ", ".join(k for k, v in ALIASES.items() if v == name) for name in LABELS)


def normalize_label(value: object) -> str | None:
    """Known spellings -> 'normal'/'tuberculosis'; blank -> None; anything else kept, lower-cased."""
    if value is None:
        return None
    text = _key(value)
    if not text:
        return None
    return ALIASES.get(text, text)


def known_label(value: object) -> str | None:
    """'normal'/'tuberculosis' for an accepted spelling, else None (blank and unknown alike)."""
    return ALIASES.get(_key(value)) if value is not None else None


def parse_label(value: object, *, file: str | Path | None = None, where: str = "") -> str | None:
    """Strict: an accepted spelling -> its class, blank -> None, anything else -> DataError naming `file`."""
    if value is None or not _key(value):
        return None
    label = known_label(value)
    if label is None:
        raise DataError(f"{where + ': ' if where else ''}unknown label {str(value)!r}", file=file,
                        fix=f"use one of the accepted spellings ({accepted_text()}), or leave it empty")
    return label


def label_from_finding(finding: object) -> str | None:
    """The class a free-text finding states: a normal reading -> normal, a TB word -> tuberculosis, else None."""
    from synthcxr.data.readings import normalize_finding

    if finding is None:
        return None
    text = normalize_finding(str(finding))
    if text is None:
        return None
    if text == NORMAL or known_label(text) == NORMAL:
        return NORMAL
    return TUBERCULOSIS if _TB_WORDS.search(text) else None
