"""Parsing of clinical attributes: the Montgomery/Shenzhen readings files and manifest values.

The original readings files are typed by hand and not uniform: "male 35yrs", "Female  28yr",
"MALE 2months", "Patient's Age: 044Y", blank lines, a byte-order mark, CRLF endings and extra
words. Parsers here accept all of these and raise `ReadingsParseError` with the reason otherwise;
readers turn that into a problem that names the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from synthcxr.data.labels import normalize_label  # noqa: F401 - re-exported: the vocabulary lives in labels.py
from synthcxr.data.records import NORMAL, TUBERCULOSIS


class ReadingsParseError(ValueError):
    """The text could not be parsed; the message says what was expected."""


@dataclass
class Reading:
    sex: str | None
    age: float | None
    finding: str | None


UNKNOWN_SEX = {"o", "u", "x", "other", "unknown"}  # DICOM-style "other/unknown": known to be unknown
_SEX_WORDS = {"male": "male", "m": "male", "man": "male", "female": "female", "f": "female", "woman": "female"}
_SEX_RE = re.compile(r"(?<![a-z])(female|male|woman|man)(?![a-z])", re.I)
_SEX_LETTER_RE = re.compile(r"^\W*([mf])(?![a-z])", re.I)
_UNIT_YEARS = {"y": 1.0, "m": 1 / 12, "w": 7 / 365.25, "d": 1 / 365.25}
_AGE_RE = re.compile(
    r"(?<![\w.])(\d{1,3}(?:\.\d+)?)\s*(years?|yrs?|yo|y|months?|mths?|mos?|mo|m|weeks?|wks?|w|days?|d)?\.?(?![a-z])",
    re.I,
)
_NORMAL_FINDINGS = {"normal", "normal chest", "normal cxr", "no finding", "no findings", "nothing abnormal",
                    "no abnormality", "no abnormalities", "negative", "unremarkable"}


def read_text(path: Path) -> str:
    """Text of a small file whatever its encoding (UTF-8 with or without BOM, else Latin-1)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:1024] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ReadingsParseError("binary file, not text")
    for encoding in ("utf-8-sig", "utf-16") if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else ("utf-8-sig",):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _lines(text: str) -> list[str]:
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    return [re.sub(r"\s+", " ", line).strip() for line in text.split("\n") if line.strip()]


def parse_sex(value: object) -> str | None:
    """'M', 'male', ' Female ', 'woman' -> 'male'/'female'; blanks and unknowns ('O', 'X') -> None."""
    if value is None:
        return None
    text = str(value).strip().lower().rstrip(".")
    return _SEX_WORDS.get(text)


def parse_age(value: object) -> float | None:
    """Age in years from 45, '45', '044Y', '35yrs', '2 months', '10D'; None when blank.

    Raises ReadingsParseError on text that is not an age, so typos are not silently dropped.
    """
    if value is None:
        return None
    if isinstance(value, int | float):
        if value != value:  # NaN from pandas-like sources
            return None
        return float(value)
    text = str(value).strip()
    if not text:
        return None
    match = _AGE_RE.fullmatch(text.replace(" ", "")) or _AGE_RE.fullmatch(text)
    if not match:
        raise ReadingsParseError(f"age {text!r} is not like '45', '044Y', '35yrs' or '2 months'")
    return _age_from_match(match)


def _age_from_match(match: re.Match[str]) -> float:
    number = float(match.group(1))
    unit = (match.group(2) or "y").lower()
    if unit.startswith("mo") or unit.startswith("mth") or unit == "m":
        factor = _UNIT_YEARS["m"]
    else:
        factor = _UNIT_YEARS.get(unit[0], 1.0)
    return round(number * factor, 4)


def normalize_finding(text: str | None) -> str | None:
    """Collapse whitespace; every spelling of a normal reading becomes exactly "normal"."""
    if text is None:
        return None
    text = re.sub(r"\s+", " ", text).strip().strip(",;")
    if not text:
        return None
    if text.lower().rstrip(".").strip() in _NORMAL_FINDINGS:
        return NORMAL
    return text


def label_from_suffix(stem: str) -> str | None:
    """CHNCXR_0001_0 -> 'normal', MCUCXR_0104_1 -> 'tuberculosis' (the sets' file-name convention)."""
    match = re.search(r"_([01])$", stem)
    if not match:
        return None
    return NORMAL if match.group(1) == "0" else TUBERCULOSIS


def parse_shenzhen(text: str) -> Reading:
    """'male 35yrs' (any case/spacing/unit, possibly followed by text) then the finding lines."""
    lines = _lines(text)
    if not lines:
        raise ReadingsParseError("file is empty; expected sex and age like 'male 35yrs', then the finding")
    for i, line in enumerate(lines[:3]):  # demographics are on the first line, rarely after a stray one
        sex_match = _SEX_RE.search(line) or _SEX_LETTER_RE.search(line)
        if not sex_match:
            continue
        rest = line[: sex_match.start()] + " " + line[sex_match.end():]
        age_match = _AGE_RE.search(rest)
        if not age_match:
            raise ReadingsParseError(f"found the sex but no age in line {line!r}; expected like 'male 35yrs'")
        tail = (rest[: age_match.start()] + " " + rest[age_match.end():]).strip(" ,;:-")
        finding_lines = ([tail] if tail else []) + lines[i + 1:]
        return Reading(
            sex=_SEX_WORDS[sex_match.group(1).lower()],
            age=_age_from_match(age_match),
            finding=normalize_finding(" ".join(finding_lines)),
        )
    raise ReadingsParseError(f"no sex and age found (first line {lines[0]!r}); expected like 'male 35yrs'")


_MCU_SEX_RE = re.compile(r"^patient\W{0,3}s?\s*sex\s*[:=\-]?\s*(.*)$", re.I)
_MCU_AGE_RE = re.compile(r"^patient\W{0,3}s?\s*age\s*[:=\-]?\s*(.*)$", re.I)


def parse_montgomery(text: str) -> Reading:
    """"Patient's Sex: M", "Patient's Age: 044Y" (any order/case/spacing), then the finding lines."""
    lines = _lines(text)
    if not lines:
        raise ReadingsParseError("file is empty; expected \"Patient's Sex: M\", \"Patient's Age: 044Y\" and the finding")
    sex = age = None
    sex_seen = age_seen = False
    finding_lines = []
    for line in lines:
        if m := _MCU_SEX_RE.match(line):
            sex_seen = True
            value = m.group(1).split(" ")[0] if m.group(1) else ""
            sex = parse_sex(value)
            if sex is None and value.lower().rstrip(".") not in UNKNOWN_SEX:
                raise ReadingsParseError(f"sex {m.group(1)!r} in line {line!r} is not M/F/male/female")
        elif m := _MCU_AGE_RE.match(line):
            age_seen = True
            age_match = _AGE_RE.search(m.group(1))
            if not age_match:
                raise ReadingsParseError(f"age in line {line!r} is not like '044Y'")
            age = _age_from_match(age_match)
        else:
            finding_lines.append(line)
    if not (sex_seen and age_seen):
        missing = " and ".join(n for n, seen in (("\"Patient's Sex\"", sex_seen), ("\"Patient's Age\"", age_seen)) if not seen)
        raise ReadingsParseError(f"no {missing} line found")
    return Reading(sex=sex, age=age, finding=normalize_finding(" ".join(finding_lines)))
