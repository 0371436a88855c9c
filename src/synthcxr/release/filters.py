"""Filters applied before a synthetic set is released; each says how many images it removed and why.

- duplicates: images with identical pixels (hashed after decoding, so two PNGs that differ only in
  their provenance text still count as one image); the lowest index is kept.
- memorization: images the evaluation flagged as near copies of training images (`synthcxr
  evaluate` results JSON). The JSON lists at most 100 flagged images; when there are more, all of
  them are in the JSONL it names (`flagged_file`, beside the JSON). Without that file export stops
  rather than release unlisted copies.
- conditioning: the real-trained classifier must agree with the label an image was generated for
  (a CSV of `file,score`, score = probability of the positive class, thresholded at `threshold`);
  `synthcxr evaluate`'s utility metric saves that CSV beside its results, so no retraining is needed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from synthcxr.errors import ConfigError, DataError
from synthcxr.fileio import read_jsonl

POSITIVE = {"label": "tuberculosis"}
"""The class whose probability a conditioning score gives (the utility classifier's positive class)."""
NEGATIVE = {"label": "normal"}


@dataclass
class FilterResult:
    name: str
    removed: list[str] = field(default_factory=list)
    """File names (relative to the generation folder) the filter removed."""
    note: str = ""
    checked: set[str] | None = None
    """Files the filter looked at (None: all); only these record it in `filters_passed`."""

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "removed": len(self.removed), "note": self.note, "examples": self.removed[:10]}


def pixel_hash(path: Path) -> str:
    """sha256 of the decoded pixels (mode, size, bytes): identical images, whatever their file metadata."""
    with Image.open(path) as im:
        h = hashlib.sha256(f"{im.mode}:{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def duplicates(rows: list[dict[str, Any]], gen_dir: Path) -> tuple[FilterResult, dict[str, str]]:
    """Drop later copies of identical images; also returns each kept file's pixel hash."""
    seen: dict[str, str] = {}
    hashes: dict[str, str] = {}
    result = FilterResult("duplicates", note="identical decoded pixels within the set (the lowest index is kept)")
    for row in rows:
        digest = pixel_hash(gen_dir / row["file"])
        if digest in seen:
            result.removed.append(row["file"])
        else:
            seen[digest] = row["file"]
            hashes[row["file"]] = digest
    return result, hashes


def read_evaluation(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("evaluation results not found", file=path, fix="pass the JSON written by `synthcxr evaluate --out`") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"evaluation results are not valid JSON ({exc})", file=path,
                          fix="pass the JSON written by `synthcxr evaluate --out`") from None
    if not isinstance(data, dict):
        raise ConfigError("evaluation results are not a JSON object", file=path, fix="pass the JSON written by `synthcxr evaluate`")
    return data


def _relative(name: str, gen_dir: Path) -> str:
    p = Path(name)
    try:
        return str(p.resolve().relative_to(gen_dir.resolve()))
    except ValueError:
        return p.name


def memorization(rows: list[dict[str, Any]], gen_dir: Path, evaluation: dict[str, Any], source: Path) -> FilterResult:
    """Drop the images the evaluation flagged as near copies of training images."""
    mem = evaluation.get("memorization")
    if not isinstance(mem, dict) or "flagged" not in mem:
        raise ConfigError("the evaluation results hold no memorization check", file=source,
                          fix="run `synthcxr evaluate` with the memorization metric and a training set (--train), "
                              "or export without --evaluation")
    flagged = _all_flagged(mem, source)
    listed = {_relative(p["synthetic"], gen_dir) for p in flagged}
    unknown = listed - {r["file"] for r in rows}
    if flagged and unknown == listed:
        raise ConfigError(f"none of the {len(listed)} flagged images belongs to this generation folder "
                          f"(e.g. {sorted(unknown)[0]})", file=source,
                          fix=f"pass the results of evaluating {gen_dir} (evaluate --fake {gen_dir})")
    thresholds = mem.get("thresholds", {})
    note = "near copies of training images flagged by `synthcxr evaluate`"
    if isinstance(thresholds, dict) and thresholds:
        note += " (" + ", ".join(f"{k} > {v.get('value', v) if isinstance(v, dict) else v}" for k, v in thresholds.items()) + ")"
    return FilterResult("memorization", [r["file"] for r in rows if r["file"] in listed], note)


def _all_flagged(mem: dict[str, Any], source: Path) -> list[dict[str, Any]]:
    """Every flagged pair: the JSON's list, or the complete `flagged_file` beside it when the list is cut."""
    flagged = mem["flagged"]
    n_flagged = mem.get("n_flagged", len(flagged))
    if n_flagged <= len(flagged):
        return flagged
    fix = ("re-run `synthcxr evaluate` with this version (it writes every flagged image to <out>_flagged.jsonl "
           "beside the results) and keep that file next to the JSON")
    if not mem.get("flagged_file"):
        raise ConfigError(f"the evaluation flagged {n_flagged} images but lists only {len(flagged)}, so the "
                          "others cannot be removed", file=source, fix=fix)
    path = Path(source).parent / mem["flagged_file"]  # an absolute name stays absolute
    if not path.is_file():
        raise ConfigError(f"the list of all {n_flagged} flagged images is missing", file=path, fix=fix)
    listed = read_jsonl(path)
    if len(listed) != n_flagged:
        raise ConfigError(f"the list of flagged images holds {len(listed)} lines but the evaluation flagged {n_flagged}",
                          file=path, fix=fix)
    return listed


def read_scores(path: Path) -> dict[str, float]:
    """`file,score` CSV -> {file name: score}."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"file", "score"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(f"scores CSV lacks column(s) {', '.join(sorted(missing))} (has {reader.fieldnames})",
                                  file=path, fix="write a header `file,score`: the image file name and the classifier's "
                                                 "probability of the positive class")
            scores = {}
            for line, rec in enumerate(reader, start=2):
                try:
                    scores[Path(rec["file"]).name] = float(rec["score"])
                except (TypeError, ValueError):
                    raise DataError(f"line {line}: score {rec['score']!r} is not a number", file=path,
                                    fix="give a probability between 0 and 1") from None
            return scores
    except FileNotFoundError:
        raise ConfigError("scores CSV not found", file=path, fix="check the --label-scores path") from None


def evaluation_scores(evaluation: dict[str, Any], source: Path) -> Path | None:
    """The per-image classifier scores the evaluation saved beside its JSON (None when it did not run utility)."""
    name = (((evaluation.get("utility") or {}).get("conditioning") or {}).get("label") or {}).get("scores_file")
    if not name:
        return None
    path = Path(source).parent / name
    if not path.is_file():
        raise ConfigError("the evaluation's per-image classifier scores are missing", file=path,
                          fix="keep the scores CSV next to the evaluation JSON (or re-run `synthcxr evaluate`), "
                              "pass another with --label-scores, or skip the filter with --no-conditioning")
    return path


def conditioning(rows: list[dict[str, Any]], scores: dict[str, float], threshold: float, source: Path,
                 attr: str = "label") -> FilterResult:
    """Drop images whose classifier score disagrees with the label they were generated for."""
    positive, negative = POSITIVE[attr], NEGATIVE[attr]
    result = FilterResult("conditioning", note=f"the real-trained classifier's {positive} probability "
                          f">= {threshold} exactly when the image was generated as {positive} (images generated "
                          f"as {negative} or {positive} only; scores from {Path(source).name})", checked=set())
    rows = [r for r in rows if r.get(attr) in (positive, negative)]  # other findings: the classifier cannot say
    missing = [r["file"] for r in rows if Path(r["file"]).name not in scores]
    if missing:
        raise ConfigError(f"{len(missing)} labelled image(s) have no score (e.g. {missing[0]})", file=source,
                          fix="score every image of the generation folder (evaluate it as a whole), or export with "
                              "--no-conditioning")
    for row in rows:
        result.checked.add(row["file"])
        agrees = (scores[Path(row["file"]).name] >= threshold) == (row[attr] == positive)
        if not agrees:
            result.removed.append(row["file"])
    return result


def apply(rows: list[dict[str, Any]], results: Iterable[FilterResult]) -> list[dict[str, Any]]:
    removed = {f for r in results for f in r.removed}
    return [r for r in rows if r["file"] not in removed]
