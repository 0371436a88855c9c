"""Downstream classifier utility and conditioning fidelity on tiny fixtures a small CNN can separate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthcxr.errors import EvaluationError
from synthcxr.evaluate.commands import results_rows
from synthcxr.evaluate.images import ImageItem, read_image_set
from synthcxr.evaluate.utility import UtilityConfig, patient_split, utility_check

NORMAL, TB = "normal", "tuberculosis"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CNNs on a shared 2-core machine: one thread is several times faster than two that contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _items(n_patients: int, per_patient: int = 2) -> list[ImageItem]:
    return [ImageItem(path=f"p{p}_{k}.png", label=TB if p % 3 == 0 else NORMAL, patient_id=f"p{p}")
            for p in range(n_patients) for k in range(per_patient)]


def xrays(root: Path, labels: list[str | None], *, seed: int, strength: float = 60.0, noise: float = 14.0,
          size: int = 24, flat: bool = False) -> list[ImageItem]:
    """One PNG per label: smooth noise, plus a bright upper-left patch of `strength` for tuberculosis.
    `flat`: every image the same mid-grey (a generator that ignores its prompt)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i, label in enumerate(labels):
        img = np.full((size, size), 120.0) if flat else 110 + rng.normal(0, noise, (size, size))
        if label == TB and not flat:
            img[size // 6: size // 2, size // 6: size // 2] += strength
        path = root / f"{root.name}_{i:03d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        item = ImageItem(path=path, label=label, patient_id=f"{root.name}{i}")
        item.key = f"folder/{path.name}"  # the id a saved split names it by
        items.append(item)
    return items


def balanced(n: int) -> list[str]:
    return [NORMAL if i % 2 == 0 else TB for i in range(n)]


def relabel(items: list[ImageItem], labels: list[str | None]) -> list[ImageItem]:
    return [ImageItem(path=it.path, label=lab, patient_id=it.patient_id) for it, lab in zip(items, labels, strict=True)]


FAST = dict(classifier="small", image_size=24, batch_size=8, lr=3e-3, n_boot=100, sex=False)


def test_patient_split_keeps_patients_whole_and_stratifies():
    train, test = patient_split(_items(30), test_fraction=0.3, seed=0)
    assert not {it.patient_id for it in train} & {it.patient_id for it in test}
    assert len(train) + len(test) == 60
    assert {it.label for it in test} == {NORMAL, TB}
    again, _ = patient_split(_items(30), test_fraction=0.3, seed=0)
    assert [it.path for it in again] == [it.path for it in train]


def test_utility_trains_three_classifiers_and_reports_conditioning(image_sets, tmp_path):
    real = read_image_set(image_sets["real"], "real")
    fake = read_image_set(image_sets["fake"], "fake")
    for i, it in enumerate(real.items):  # give the real set sex so the sex check runs
        it.sex = "male" if i % 2 else "female"
    cfg = UtilityConfig(image_size=32, epochs=1, batch_size=8, n_boot=20, seeds=2, classifier="small")
    split = tmp_path / "split.json"
    res = utility_check(real.items, None, fake.items, cfg, device="cpu", seed=0, split_path=split)
    for variant in ("real", "synthetic", "real+synthetic"):
        assert 0.0 <= res[variant]["auc"] <= 1.0 and len(res[variant]["per_seed"]) == 2
        lo, hi = res[variant]["ci"]
        assert lo <= hi
    assert res["real+synthetic"]["n_train"] == res["real"]["n_train"] + res["synthetic"]["n_train"]
    cond = res["conditioning"]["label"]
    assert cond["n"] == len(fake) and {NORMAL, TB} <= set(cond)
    assert 0.0 <= cond["auc"]["value"] <= 1.0 and 0.0 <= cond["balanced_accuracy"]["value"] <= 1.0
    assert "auc" in res["conditioning"]["sex"]
    saved = json.loads(split.read_text())
    sides = {side: {row["patient_id"] for row in saved[side]} for side in ("train", "val", "test")}
    assert sides["test"] and sides["val"] and not sides["test"] & (sides["train"] | sides["val"])


def test_utility_needs_both_classes(image_sets):
    real = read_image_set(image_sets["real"], "real")
    only_normal = [it for it in real.items if it.label == NORMAL]
    with pytest.raises(EvaluationError, match="at least 2 'normal' and 2 'tuberculosis'"):
        utility_check(only_normal, None, [], UtilityConfig(image_size=32, epochs=1), device="cpu", seed=0, split_path=None)


@pytest.fixture(scope="module")
def separable(tmp_path_factory) -> dict[str, list[ImageItem]]:
    root = tmp_path_factory.mktemp("separable")
    return {"real": xrays(root / "real", balanced(40), seed=1),
            "test": xrays(root / "test", balanced(16), seed=3),
            "fake": xrays(root / "fake", balanced(20), seed=2)}


def test_conditioning_fidelity_is_high_for_true_labels_low_for_swapped_and_chance_for_shuffled(separable):
    """Audit case: at a fixed 0.5 threshold a collapsed classifier gave 0.48 / 0.52 / 0.48 for true,
    swapped and shuffled labels. AUC against the intended label separates the three."""
    cfg = UtilityConfig(**FAST, epochs=4, seeds=2)
    fake = separable["fake"]
    swapped = relabel(fake, [TB if it.label == NORMAL else NORMAL for it in fake])
    shuffled = relabel(fake, list(np.random.default_rng(5).permutation([it.label for it in fake])))
    out = {}
    for name, items in (("true", fake), ("swapped", swapped), ("shuffled", shuffled)):
        res = utility_check(separable["real"], separable["test"], items, cfg, device="cpu", seed=0, split_path=None)
        out[name] = res["conditioning"]["label"]
    assert out["true"]["auc"]["value"] > 0.85 and out["true"]["balanced_accuracy"]["value"] > 0.75
    assert out["swapped"]["auc"]["value"] < 0.15 and out["swapped"]["balanced_accuracy"]["value"] < 0.25
    lo, hi = out["shuffled"]["auc"]["ci"]
    assert lo < 0.5 < hi
    assert not out["true"]["collapsed"]


def test_collapsed_predictions_are_reported(separable, tmp_path):
    """A generator that ignores its prompt: every image alike, so every prediction is one class."""
    flat = xrays(tmp_path / "flat", balanced(12), seed=4, flat=True)
    cfg = UtilityConfig(**FAST, epochs=3, seeds=2)
    res = utility_check(separable["real"], separable["test"], flat, cfg, device="cpu", seed=0, split_path=None)
    cond = res["conditioning"]["label"]
    assert cond["collapsed"] and cond["auc"]["value"] == pytest.approx(0.5)
    assert any("collapsed" in w and "conditioning (label)" in w for w in res["warnings"])
    assert any("COLLAPSED" in row[3] for row in results_rows({"utility": res}))


def test_duplicates_of_real_images_add_no_significant_gain_at_equal_steps(tmp_path):
    """Audit case: with fixed epochs, exact copies of the real training images doubled the optimizer
    steps and "raised" AUC from 0.68 to 0.90. At equal steps the copies add nothing."""
    real = xrays(tmp_path / "real", balanced(48), seed=1, strength=22, noise=20)
    test = xrays(tmp_path / "test", balanced(40), seed=3, strength=22, noise=20)
    split = tmp_path / "split.json"  # fix the sides so the copies are copies of training images only
    sides = ["val" if i % 4 == 0 else "train" for i in range(len(real))]
    split.write_text(json.dumps({"images": [{"id": it.key, "split": s} for it, s in zip(real, sides, strict=True)]
                                 + [{"id": it.key, "split": "test"} for it in test]}))
    copies = [ImageItem(path=it.path, label=it.label, patient_id=f"copy{k}")
              for k, (it, s) in enumerate(zip(real, sides, strict=True)) if s == "train"]
    cfg = UtilityConfig(**FAST, epochs=2, seeds=3)
    res = utility_check(real + test, None, copies, cfg, device="cpu", seed=0, split_path=None, split_file=split)
    steps = res["protocol"]["max_steps"]
    assert all(s <= steps for v in ("real", "synthetic", "real+synthetic") for s in res[v]["steps"])
    assert res["real+synthetic"]["n_train"] == 2 * res["real"]["n_train"]
    gain = res["real+synthetic"]["minus_real"]
    assert not gain["significant"] and gain["ci"][0] <= 0.0 <= gain["ci"][1]
    assert res["split"]["n_test"] == len(test) and "saved split" in res["split"]["source"]


def test_seeds_give_mean_sd_and_a_ci_and_a_small_test_set_is_flagged(separable):
    cfg = UtilityConfig(**FAST, epochs=2, seeds=3)
    res = utility_check(separable["real"], separable["test"], separable["fake"], cfg, device="cpu", seed=0, split_path=None)
    real = res["real"]
    assert len(real["per_seed"]) == 3 and real["auc"] == pytest.approx(np.mean(real["per_seed"]))
    assert real["ci"][0] <= real["auc"] <= real["ci"][1] and real["sd_seeds"] >= 0
    assert res["protocol"]["seeds"] == [0, 1, 2] and "seeds and test images" in res["protocol"]["ci"]
    assert any("real test set has only 8 'tuberculosis' and 8 'normal'" in w for w in res["warnings"])


@pytest.mark.parametrize("labels, missing", [
    ([NORMAL] * 10, "0 'tuberculosis'"),
    ([NORMAL] * 9 + [TB], "1 more 'tuberculosis'"),
    ([None] * 10, "none of the 10 synthetic image(s) records its label"),
])
def test_one_class_or_unlabelled_synthetic_sets_say_what_is_missing_and_print_no_number(separable, tmp_path, labels, missing):
    fake = xrays(tmp_path / "fake", labels, seed=2)
    cfg = UtilityConfig(**FAST, epochs=1, seeds=1)
    res = utility_check(separable["real"], separable["test"], fake, cfg, device="cpu", seed=0, split_path=None)
    for variant in ("synthetic", "real+synthetic"):
        assert missing in res[variant]["skipped"] and "auc" not in res[variant]
    assert any(missing in w for w in res["warnings"])
    rows = {row[0]: row for row in results_rows({"utility": res})}
    assert rows["AUC trained on synthetic"][1] == "–" and "skipped" in rows["AUC trained on synthetic"][3]
    cond = res["conditioning"]["label"]
    if TB not in labels:  # AUC and balanced accuracy need both classes
        assert "skipped" in cond and "auc" not in cond
        assert rows["Conditioning (label)"][1] == "–"
    else:  # one TB image is enough to rank, not to train
        assert "auc" in cond


def test_unknown_labels_are_an_error_naming_the_image(separable, tmp_path):
    odd = xrays(tmp_path / "odd", ["pneumonia", NORMAL, TB, NORMAL], seed=6)
    with pytest.raises(EvaluationError, match="unknown label.*pneumonia") as err:
        utility_check(separable["real"] + odd, separable["test"], [], UtilityConfig(**FAST), device="cpu", seed=0,
                      split_path=None)
    assert "tuberculosis: 1, tb" in err.value.render().lower()


def test_cli_tests_the_classifier_on_the_test_patients_of_a_saved_split(tmp_path):
    """`--split` (a training run's splits.json): the generator's held-out patients are the test set."""
    from synthcxr.cli import main
    from synthcxr.data.config import DataConfig, SplitConfig
    from synthcxr.data.dataset import load_records
    from synthcxr.data.fixtures import make_fixture_dataset
    from synthcxr.data.splits import split_records

    from .conftest import make_images

    data = make_fixture_dataset(tmp_path / "data", "shenzhen", n=24, size=32)
    split = tmp_path / "splits.json"
    groups = split_records(load_records(DataConfig(path=data)), SplitConfig(val=0.2, test=0.25), split)
    fake = make_images(tmp_path / "fake", 8, size=32, seed=2, layout="generation")
    out = tmp_path / "eval.json"
    main(["evaluate", "--real", str(data), "--fake", str(fake), "--train", str(data), "--split", str(split),
          "--out", str(out), "--metrics", "utility", "--extractor", "random", "--set", "utility.classifier=small",
          "--set", "utility.image_size=32", "--set", "utility.seeds=1", "--set", "utility.n_boot=20", "--set", "utility.sex=false"])
    res = json.loads(out.read_text())["utility"]
    assert "saved split" in res["split"]["source"]
    assert res["split"]["n_test"] == len(groups["test"]) and res["split"]["n_val"] == len(groups["val"])
    assert res["split"]["n_test_patients"] == len({r.patient_id for r in groups["test"]})
