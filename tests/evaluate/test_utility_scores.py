"""The real-trained classifier's score for every synthetic image is saved beside the results, and
`export-dataset --evaluation` uses it for the conditioning-fidelity filter without retraining."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from synthcxr.errors import ConfigError
from synthcxr.evaluate.run import EvaluateConfig, evaluate
from synthcxr.evaluate.utility import UtilityConfig, auc_rows, utility_check
from synthcxr.release.export import ExportOptions, export_dataset

from .test_utility import FAST, NORMAL, TB, balanced, xrays

SWAPPED = {1, 4, 9}
"""Synthetic images whose manifest label is the other class than the one they show."""


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_scores_file_lists_every_labelled_synthetic_image(tmp_path):
    real = xrays(tmp_path / "real", balanced(40), seed=1)
    test = xrays(tmp_path / "test", balanced(16), seed=3)
    fake = xrays(tmp_path / "fake", [*balanced(12), None], seed=2)  # the unlabelled one has nothing to score
    path = tmp_path / "eval_label_scores.csv"
    res = utility_check(real, test, fake, UtilityConfig(**FAST, epochs=4, seeds=1), device="cpu", seed=0,
                        split_path=None, scores_path=path)
    rows = _read(path)
    assert [r["file"] for r in rows] == [str(it.path) for it in fake[:12]]
    assert [r["label"] for r in rows] == [it.label for it in fake[:12]]
    cond = res["conditioning"]["label"]
    assert cond["scores_file"] == path.name
    # one seed: the conditioning AUC is exactly the AUC of the saved scores against the intended labels
    y = np.array([r["label"] == TB for r in rows], float)
    scores = np.array([[float(r["score"]) for r in rows]])
    assert auc_rows(y, scores)[0] == pytest.approx(cond["auc"]["value"])
    assert cond["auc"]["value"] > 0.85


def _generation(root: Path, n: int) -> Path:
    """A generation folder whose manifest labels SWAPPED images with the class they do not show."""
    items = xrays(root, balanced(n), seed=2)
    rows = []
    for i, it in enumerate(items):
        label = it.label if i not in SWAPPED else (NORMAL if it.label == TB else TB)
        rows.append({"file": Path(it.path).name, "index": i, "seed": i, "prompt": f"{label} chest x-ray", "label": label})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _labelled(root: Path, n: int, seed: int) -> Path:
    for i, it in enumerate(xrays(root / "flat", balanced(n), seed=seed)):
        (root / it.label).mkdir(exist_ok=True)
        Path(it.path).rename(root / it.label / f"{i:03d}.png")
    (root / "flat").rmdir()
    return root


def test_export_filters_by_the_evaluation_scores_and_the_card_counts_them(tmp_path):
    gen = _generation(tmp_path / "gen", 16)
    out = tmp_path / "eval.json"
    cfg = EvaluateConfig(real=_labelled(tmp_path / "real", 40, 1), fake=gen, test=_labelled(tmp_path / "test", 16, 3),
                         out=out, metrics=["utility"], extractor={"name": "random", "device": "cpu"},
                         utility={**FAST, "epochs": 4, "seeds": 1})
    cond = evaluate(cfg)["utility"]["conditioning"]["label"]
    rows = {Path(r["file"]).name: r for r in _read(tmp_path / cond["scores_file"])}
    assert set(rows) == {p.name for p in gen.glob("*.png")}

    threshold = 0.5
    summary = export_dataset(gen, tmp_path / "release", ExportOptions(evaluation=out, label_threshold=threshold))
    disagree = {name for name, r in rows.items() if (float(r["score"]) >= threshold) != (r["label"] == TB)}
    assert summary["label_scores"] == str(tmp_path / cond["scores_file"])
    counts = {f["name"]: f["removed"] for f in summary["filters"]}
    assert counts["conditioning"] == len(disagree) > 0
    assert {f"gen_{i:03d}.png" for i in SWAPPED} <= disagree  # the mislabelled images are the ones removed
    kept = {json.loads(x)["file_name"] for p in (tmp_path / "release").rglob("metadata.jsonl")
            for x in p.read_text().splitlines()}
    assert kept == set(rows) - disagree
    card = (tmp_path / "release" / "README.md").read_text()
    assert f"**conditioning**: removed {len(disagree)} image(s)" in card and "eval_label_scores.csv" in card
    # the filter can be left out; a scores file that went missing is named with the fix
    skipped = export_dataset(gen, tmp_path / "all", ExportOptions(evaluation=out, conditioning=False))
    assert [f["name"] for f in skipped["filters"]] == ["duplicates"] and skipped["images_out"] == len(rows)
    (tmp_path / cond["scores_file"]).unlink()
    with pytest.raises(ConfigError, match="per-image classifier scores are missing") as exc:
        export_dataset(gen, tmp_path / "none", ExportOptions(evaluation=out))
    assert "eval_label_scores.csv" in str(exc.value) and "--no-conditioning" in str(exc.value)
