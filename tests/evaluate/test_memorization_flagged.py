"""Every flagged near copy is listed (a JSONL beside the results when there are more than the JSON holds),
so `export-dataset`'s privacy filter removes all of them however many there are."""

from __future__ import annotations

import json

import pytest

from synthcxr.errors import ConfigError
from synthcxr.evaluate.memorization import FLAGGED_INLINE
from synthcxr.evaluate.run import EvaluateConfig, evaluate
from synthcxr.release.export import ExportOptions, export_dataset

from .conftest import make_images


def test_more_flagged_than_the_json_holds_are_all_listed_and_removed_on_export(tmp_path):
    n_copies = FLAGGED_INLINE + 4
    # the generator "memorized": its first images are the training images themselves (same seed, same pixels)
    train = make_images(tmp_path / "train", n_copies, seed=1)
    gen = make_images(tmp_path / "gen", n_copies + 3, seed=1, layout="generation")
    out = tmp_path / "eval.json"
    cfg = EvaluateConfig(real=train, fake=gen, train=train, out=out, metrics=["memorization"],
                         extractor={"name": "random", "device": "cpu"},
                         memorization={"image_size": 32, "max_shift": 0, "rotations": [0.0], "scales": [1.0],
                                       "mirror": False, "candidates": 1, "copy_threshold": 0.995,
                                       "flag_by_features": False, "top_pairs": 0})
    mem = evaluate(cfg)["memorization"]
    copies = {f"img_1_{i:03d}.png" for i in range(n_copies)}
    assert mem["n_flagged"] == n_copies and len(mem["flagged"]) == FLAGGED_INLINE
    listed = [json.loads(x) for x in (tmp_path / mem["flagged_file"]).read_text().splitlines()]
    assert {r["synthetic"].rsplit("/", 1)[-1] for r in listed} == copies and len(listed) == n_copies
    assert json.loads(out.read_text())["memorization"]["flagged_file"] == "eval_flagged.jsonl"  # beside the JSON

    summary = export_dataset(gen, tmp_path / "release", ExportOptions(evaluation=out))
    assert {f["name"]: f["removed"] for f in summary["filters"]} == {"duplicates": 0, "memorization": n_copies}
    kept = {json.loads(x)["file_name"] for p in (tmp_path / "release").rglob("metadata.jsonl")
            for x in p.read_text().splitlines()}
    assert kept == {f"img_1_{i:03d}.png" for i in range(n_copies, n_copies + 3)}
    # without the full list, export refuses rather than release unlisted copies
    (tmp_path / "eval_flagged.jsonl").unlink()
    with pytest.raises(ConfigError, match=f"list of all {n_copies} flagged images is missing") as exc:
        export_dataset(gen, tmp_path / "release2", ExportOptions(evaluation=out))
    assert "eval_flagged.jsonl" in str(exc.value) and not (tmp_path / "release2").exists()
