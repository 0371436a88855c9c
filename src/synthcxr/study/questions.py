"""Which questions a study asks, and how one submitted answer is validated against them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field

from synthcxr.config import StrictModel

FINDINGS = ("tuberculosis", "normal", "unsure")
CONFIDENCE_LEVELS = {1: "low", 2: "medium", 3: "high"}


class QuestionsConfig(StrictModel):
    """Per-study questionnaire (YAML via `study create --questions q.yaml`)."""

    realism: bool = True
    """Anchored 1-5 Likert realism rating."""
    realism_anchors: list[str] = Field(
        default_factory=lambda: [
            "1 - clearly synthetic",
            "2 - probably synthetic",
            "3 - cannot tell",
            "4 - probably real",
            "5 - clearly real",
        ],
        min_length=5,
        max_length=5,
    )
    """Text shown for each of the five scale points (1 = least realistic)."""
    real_vs_synthetic: bool = True
    """Forced choice: is this image real or synthetic?"""
    confidence: bool = True
    """Confidence (low/medium/high) in the real-vs-synthetic choice."""
    finding: bool = False
    """Ask for the finding: tuberculosis / normal / unsure."""
    comment: bool = False
    """Offer a free-text comment box (always optional)."""
    instructions: str = (
        "Rate how realistic each chest X-ray looks. Some images are real, some were generated. "
        "Take your time; you can stop and continue later with the same browser."
    )


@dataclass
class AnswerInput:
    """One validated answer (None = question not asked)."""

    realism: int | None
    judged_real: bool | None
    confidence: int | None
    finding: str | None
    comment: str | None
    client_ms: int | None
    picked: str | None = None
    """Paired design: the side called synthetic ("left" / "right")."""


class AnswerRejected(ValueError):
    """The submitted form does not answer the study's questions."""


_ASCII_INT = re.compile(r"[0-9]{1,12}")


def _ascii_int(raw: str) -> int | None:
    """ASCII digits only: `str.isdigit` also accepts '²' (int() then fails) and '٣' (int() reads 3)."""
    return int(raw) if _ASCII_INT.fullmatch(raw) else None


def parse_answer(q: QuestionsConfig, form: dict[str, str], design: str = "single") -> AnswerInput:
    """Validate form fields; required = every enabled question except the comment. A paired study
    asks only which side is synthetic and (if enabled) the confidence."""

    def _int(name: str, lo: int, hi: int) -> int:
        value = _ascii_int((form.get(name) or "").strip())
        if value is None or not lo <= value <= hi:
            raise AnswerRejected(f"{name} must be a whole number from {lo} to {hi}")
        return value

    if design == "paired":
        picked = (form.get("picked") or "").strip()
        if picked not in ("left", "right"):
            raise AnswerRejected("choose the left or the right image")
        confidence = _int("confidence", 1, 3) if q.confidence else None
        comment = ((form.get("comment") or "").strip()[:4000] or None) if q.comment else None
        raw_ms = _ascii_int((form.get("elapsed_ms") or "").strip())
        return AnswerInput(None, None, confidence, None, comment,
                           min(raw_ms, 86_400_000) if raw_ms is not None else None, picked)
    realism = _int("realism", 1, 5) if q.realism else None
    judged_real = None
    if q.real_vs_synthetic:
        choice = (form.get("choice") or "").strip()
        if choice not in ("real", "synthetic"):
            raise AnswerRejected("choose real or synthetic")
        judged_real = choice == "real"
    confidence = _int("confidence", 1, 3) if q.real_vs_synthetic and q.confidence else None
    finding = None
    if q.finding:
        finding = (form.get("finding") or "").strip()
        if finding not in FINDINGS:
            raise AnswerRejected(f"finding must be one of {', '.join(FINDINGS)}")
    comment = None
    if q.comment:
        comment = (form.get("comment") or "").strip()[:4000] or None
    raw_ms = _ascii_int((form.get("elapsed_ms") or "").strip())
    client_ms = min(raw_ms, 86_400_000) if raw_ms is not None else None
    return AnswerInput(realism, judged_real, confidence, finding, comment, client_ms)

