"""Downstream classifier utility and conditioning fidelity on tiny fixtures."""

from __future__ import annotations

import json

import pytest

from synthcxr.errors import EvaluationError
from synthcxr.evaluate.images import ImageItem, read_image_set
from synthcxr.evaluate.utility import UtilityConfig, patient_split, utility_check


def _items(n_patients: int, per_patient: int = 2) -> list[ImageItem]:
    return [ImageItem(path=f"p{p}_{k}.png", label="tuberculosis" if p % 3 == 0 else "normal", patient_id=f"p{p}")
            for p in range(n_patients) for k in range(per_patient)]


def test_patient_split_keeps_patients_whole_and_stratifies():
    train, test = patient_split(_items(30), test_fraction=0.3, seed=0)
    assert not {it.patient_id for it in train} & {it.patient_id for it in test}
    assert len(train) + len(test) == 60
    assert {it.label for it in test} == {"normal", "tuberculosis"}
    again, _ = patient_split(_items(30), test_fraction=0.3, seed=0)
    assert [it.path for it in again] == [it.path for it in train]


def test_utility_trains_three_classifiers_and_reports_conditioning(image_sets, tmp_path):
    real = read_image_set(image_sets["real"], "real")
    fake = read_image_set(image_sets["fake"], "fake")
    for i, it in enumerate(real.items):  # give the real set sex so the sex check runs
        it.sex = "male" if i % 2 else "female"
    cfg = UtilityConfig(image_size=32, epochs=1, batch_size=8, n_boot=20)
    split = tmp_path / "split.json"
    res = utility_check(real.items, None, fake.items, cfg, device="cpu", seed=0, split_path=split)
    for variant in ("real", "synthetic", "real+synthetic"):
        assert 0.0 <= res[variant]["auc"] <= 1.0
        lo, hi = res[variant]["ci"]
        assert lo <= hi
    assert res["real+synthetic"]["n_train"] == res["real"]["n_train"] + res["synthetic"]["n_train"]
    cond = res["conditioning"]["label"]
    assert cond["n"] == len(fake) and {"normal", "tuberculosis"} <= set(cond)
    assert 0.0 <= cond["tuberculosis"]["agreement"] <= 1.0
    assert "overall" in res["conditioning"]["sex"]
    saved = json.loads(split.read_text())
    test_patients = {row["patient_id"] for row in saved["test"]}
    assert test_patients and not test_patients & {row["patient_id"] for row in saved["train"]}


def test_utility_needs_both_classes(image_sets):
    real = read_image_set(image_sets["real"], "real")
    only_normal = [it for it in real.items if it.label == "normal"]
    with pytest.raises(EvaluationError, match="at least 2 'normal' and 2 'tuberculosis'"):
        utility_check(only_normal, None, [], UtilityConfig(image_size=32, epochs=1), device="cpu", seed=0, split_path=None)
