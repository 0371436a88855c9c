"""Patient-level, label-stratified, seeded splits that are saved and reloaded."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from synthcxr.data.config import SplitConfig
from synthcxr.data.records import XrayRecord
from synthcxr.data.splits import load_split, record_id, split_records
from synthcxr.errors import DataError


def _records(n_patients=60, images_per_patient=(1, 2, 3), tb_every=3):
    records = []
    for p in range(n_patients):
        label = "tuberculosis" if p % tb_every == 0 else "normal"
        for k in range(images_per_patient[p % len(images_per_patient)]):
            records.append(XrayRecord(image_path=None, patient_id=f"P{p:03d}", source="folder", label=label,
                                      extra={"relpath": f"P{p:03d}_{k}.png"}))
    return records


def _patients(records):
    return {r.patient_id for r in records}


def test_no_patient_in_two_splits():
    groups = split_records(_records(), SplitConfig(val=0.2, test=0.2, seed=0))
    train, val, test = (_patients(groups[s]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert sum(len(g) for g in groups.values()) == len(_records())


def test_stratified_by_label():
    records = _records(n_patients=100)
    groups = split_records(records, SplitConfig(val=0.1, test=0.2, seed=5))
    patients_by_label = Counter(r.label for r in {r.patient_id: r for r in records}.values())
    for name, fraction in (("val", 0.1), ("test", 0.2)):
        by_label = Counter(r.label for r in {r.patient_id: r for r in groups[name]}.values())
        for label, total in patients_by_label.items():
            assert by_label[label] == round(total * fraction), (name, label)


def test_same_seed_same_split_other_seed_other_split():
    records = _records()
    a = split_records(records, SplitConfig(seed=1))
    b = split_records(list(reversed(records)), SplitConfig(seed=1))  # order of reading does not matter
    c = split_records(records, SplitConfig(seed=2))
    assert _patients(a["test"]) == _patients(b["test"]) and _patients(a["val"]) == _patients(b["val"])
    assert _patients(a["test"]) != _patients(c["test"])


def test_tiny_sets_keep_training_data():
    records = _records(n_patients=2, images_per_patient=(1,), tb_every=2)
    groups = split_records(records, SplitConfig(val=0.4, test=0.4))
    assert len(groups["train"]) == 2  # one patient per label: nothing can be held out


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_saved_and_reloaded(tmp_path, suffix):
    records = _records()
    out = tmp_path / f"split{suffix}"
    first = split_records(records, SplitConfig(seed=3), out)
    assert out.is_file()
    reloaded = load_split(out, records)
    for name in ("train", "val", "test"):
        assert [record_id(r) for r in reloaded[name]] == [record_id(r) for r in first[name]]
    again = split_records(records, SplitConfig(seed=3), out)  # an existing split file is reused
    assert [r.patient_id for r in again["test"]] == [r.patient_id for r in first["test"]]
    if suffix == ".json":
        saved = json.loads(out.read_text())
        assert saved["settings"] == {"val": 0.1, "test": 0.1, "seed": 3}
        assert sum(saved["counts"].values()) == len(records)
        with pytest.raises(DataError, match="other settings"):
            split_records(records, SplitConfig(seed=4), out)


def test_changed_data_set_is_detected(tmp_path):
    records = _records()
    out = tmp_path / "split.json"
    split_records(records, SplitConfig(), out)
    extra = XrayRecord(image_path=None, patient_id="NEW", source="folder", extra={"relpath": "NEW.png"})
    with pytest.raises(DataError, match="not in the saved split"):
        load_split(out, [*records, extra])
