"""What to generate: one job per image (index, prompt, seed, clinical attributes).

Prompts come from a single `prompt` repeated `n` times, or from a CSV of clinical attributes
(columns sex, age, finding and/or label, optional n/count and prompt) turned into captions with the
same template training used, so a model fine-tuned on "a chest x-ray of a 45 year old male,
tuberculosis" is asked in its own words. Image i always gets seed `seed + i`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthcxr.errors import DataError, Problem, ProblemsError, did_you_mean

CSV_COLUMNS = ("sex", "age", "finding", "label", "n", "count", "prompt", "caption")
SEX_VALUES = {"m": "male", "male": "male", "f": "female", "female": "female"}


@dataclass(frozen=True)
class ImageJob:
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    attributes: dict[str, Any] = field(default_factory=dict)
    """label / sex / age when the prompt was made from attributes (kept in the manifest)."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    count: int
    attributes: dict[str, Any]


def _row_problem(path: Path, line: int, message: str, fix: str) -> Problem:
    return Problem(f"{path}:{line}", message, fix)


def read_prompts_csv(path: str | Path, captions: Any, default_count: int) -> list[PromptRow]:
    """Parse the attributes CSV; every bad row is reported at once (file:line, what, fix)."""
    from synthcxr.data.captions import caption_from_attributes
    from synthcxr.data.labels import accepted_text, known_label, label_from_finding

    path = Path(path)
    if not path.is_file():
        raise DataError("prompts CSV not found", file=path, fix="check the path given as prompts_csv / --prompts-csv")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        unknown = [h for h in header if h not in CSV_COLUMNS]
        if not header or unknown:
            hints = [f"{h!r}{did_you_mean(h, CSV_COLUMNS)}" for h in unknown]
            raise DataError(f"prompts CSV has unknown or no columns: {', '.join(hints) or 'empty header'}", file=path,
                            fix=f"use the columns {', '.join(CSV_COLUMNS)} (n/count and prompt are optional)")
        rows: list[PromptRow] = []
        problems: list[Problem] = []
        for line, raw in enumerate(reader, start=2):
            rec = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not any(rec.values()):
                continue
            sex = rec.get("sex", "")
            if sex and sex.lower() not in SEX_VALUES:
                problems.append(_row_problem(path, line, f"sex {sex!r} is not male/female", "write male, female, M, F or leave it empty"))
                continue
            age_text = rec.get("age", "").lower().removesuffix("y").removesuffix("yrs").strip()
            try:
                age = float(age_text) if age_text else None
            except ValueError:
                problems.append(_row_problem(path, line, f"age {rec['age']!r} is not a number", "write the age in years, e.g. 45"))
                continue
            count_text = rec.get("n") or rec.get("count") or ""
            try:
                count = int(count_text) if count_text else default_count
                if count < 0:
                    raise ValueError
            except ValueError:
                problems.append(_row_problem(path, line, f"count {count_text!r} is not a whole number >= 0", "write e.g. 4"))
                continue
            label_text = rec.get("label", "")
            label = known_label(label_text)
            if label_text and label is None:
                problems.append(_row_problem(path, line, f"label {label_text!r} is not a known label",
                                             f"use an accepted spelling ({accepted_text()}) or leave it empty"))
                continue
            attrs = {"label": label, "sex": SEX_VALUES[sex.lower()] if sex else None, "age": age}
            if rec.get("finding"):
                attrs["finding"] = rec["finding"]
            prompt = rec.get("prompt") or rec.get("caption") or caption_from_attributes(captions, **attrs)
            if label is None:  # a finding-only row still records the class it asks for (caption unchanged)
                attrs["label"] = label_from_finding(rec.get("finding"))
            rows.append(PromptRow(prompt, count, attrs))
    if problems:
        raise ProblemsError(problems, what=f"prompts CSV {path}")
    if not rows or sum(r.count for r in rows) == 0:
        raise DataError("prompts CSV asks for no images", file=path, fix="add rows (and n/count > 0)")
    return rows


def plan_jobs(cfg: Any) -> list[ImageJob]:
    """All images of this generation, in a fixed order (so index, file name and seed never change)."""
    if cfg.prompts_csv is not None:
        rows = read_prompts_csv(cfg.prompts_csv, cfg.captions, cfg.n)
    else:
        rows = [PromptRow(cfg.prompt, cfg.n, {})]
    jobs: list[ImageJob] = []
    for row in rows:
        for _ in range(row.count):
            i = len(jobs)
            jobs.append(ImageJob(i, row.prompt, cfg.negative_prompt, cfg.seed + i, row.attributes))
    return jobs


def default_prompt_for_run(model: str | Path) -> str | None:
    """The prompt a training run was taught, so `generate --model RUN` works without --prompt.

    DreamBooth-style runs learned their instance prompt ("a sks chest x-ray"); caption-trained runs
    get their first validation prompt, else the class prompt. None when `model` is not a run.
    """
    from synthcxr.models.load import RUN_MODEL_FILE

    run_config = Path(model) / "config.yaml"
    if not (Path(model) / RUN_MODEL_FILE).is_file() or not run_config.is_file():
        return None
    from synthcxr.train.config import load_train_config
    from synthcxr.train.methods import class_prompt, instance_prompt

    cfg = load_train_config(run_config)
    if cfg.method.prompt_mode == "instance":
        return instance_prompt(cfg)
    if cfg.train.validation_prompts:
        return cfg.train.validation_prompts[0]
    return class_prompt(cfg)
