"""Patient re-identification: train-reid on fixture patients, and evaluate --metrics reid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthcxr.cli import app
from synthcxr.data.config import DataConfig
from synthcxr.data.dataset import load_records
from synthcxr.data.fixtures import make_fixture_dataset
from synthcxr.errors import DataError
from synthcxr.evaluate.reid import ReidEvalConfig, reid_check
from synthcxr.privacy.reid import ReidTrainConfig, load_reid, train_reid

# tiny network, 32 px: trains in tens of seconds on two loaded cores
TRAIN = {"model": {"backbone": "tiny", "image_size": 32}, "steps": 400, "eval_every": 100, "lr": 3e-3, "batch_size": 32}
pytestmark = pytest.mark.slow  # one module-wide training of ~400 small steps (tens of seconds)


@pytest.fixture(scope="module")
def one_thread():
    """Two cores shared by many processes: one intra-op thread is ~20x faster than two spinning ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = make_fixture_dataset(tmp_path_factory.mktemp("reid_data"), "nih", n=240, size=48, seed=0, per_patient=4)
    records = load_records(DataConfig(path=root, format="nih", resolution=48))
    out = tmp_path_factory.mktemp("reid_run")
    summary = train_reid(records, ReidTrainConfig(**TRAIN), out)
    return records, summary, out


def test_verification_auc_on_held_out_patients(trained):
    records, summary, out = trained
    auc = summary["verification_auc"]
    assert auc["value"] >= 0.95, auc
    assert auc["ci"][0] <= auc["value"] <= auc["ci"][1]
    patients = summary["patients"]
    assert not set(patients["train"]) & set(patients["test"]) and not set(patients["val"]) & set(patients["test"])
    assert auc["n_patients"] == len(patients["test"])
    saved = json.loads((out / "reid.json").read_text())
    assert saved["calibration"]["fmr"] == 0.01 and "false-match rate" in saved["calibration"]["rule"]


def test_saved_network_reloads_with_the_same_scores(trained):
    records, summary, out = trained
    model = load_reid(out / "reid.pt")
    assert model.cfg.backbone == "tiny" and model.calibration == summary["calibration"]
    again = load_reid(out)  # the folder works too
    x = np.random.default_rng(0).uniform(0, 1, (3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(model.embed(x), again.embed(x), rtol=1e-6)


def _write(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8)).save(path)


def _visit(path: Path) -> np.ndarray:
    """Transformed: shifted by 1 px (edges repeated, no wrap-around), a little noise: not the same file."""
    arr = np.asarray(Image.open(path).convert("L"), np.float64)
    arr = np.pad(arr, 1, mode="edge")[:-2, 2:]
    return arr + np.random.default_rng(0).normal(0, 2, arr.shape)


@pytest.fixture(scope="module")
def generator_sets(trained, tmp_path_factory):
    """train/: three images of each re-ID training patient; same/: their *fourth* image, transformed;
    other/: images of patients from another fixture (never seen anywhere)."""
    records, summary, _ = trained
    base = tmp_path_factory.mktemp("gen")
    (base / "train").mkdir()
    by_patient: dict[str, list] = {}
    for r in records:
        by_patient.setdefault(f"{r.source}/{r.patient_id}", []).append(r)
    for pid in summary["patients"]["train"][:20]:
        recs = sorted(by_patient[pid], key=lambda r: r.image_path.name)
        for r in recs[:-1]:
            shutil.copy(r.image_path, base / "train" / r.image_path.name)
        _write(_visit(recs[-1].image_path), base / "same" / f"{recs[-1].image_path.stem}_v.png")
    other_root = make_fixture_dataset(tmp_path_factory.mktemp("other"), "nih", n=20, size=48, seed=7, per_patient=1)
    for i, p in enumerate(sorted(other_root.rglob("*.png"))[:20]):
        _write(_visit(p), base / "other" / f"o{i:02d}.png")
    return base


def test_reid_flags_other_images_of_training_patients_not_other_patients(trained, generator_sets, tmp_path, one_thread):
    _, _, out = trained
    train = sorted((generator_sets / "train").glob("*.png"))
    same, _ = reid_check(sorted((generator_sets / "same").glob("*.png")), train,
                         ReidEvalConfig(weights=out / "reid.pt"), pairs_dir=tmp_path / "pairs")
    other, _ = reid_check(sorted((generator_sets / "other").glob("*.png")), train, ReidEvalConfig(weights=out / "reid.pt"))
    # at a 1% false-match threshold (calibrated on unseen patients) a tiny 32 px network catches a good part of
    # the other visits of training patients and about as few new patients as the false-match rate allows
    # (measured: 0.55 and 0.05 of 20; with 48 held-out images the threshold is their maximum)
    assert same["fraction_above"] >= 0.3, same
    assert other["fraction_above"] <= 0.1, other
    assert same["fraction_above"] > other["fraction_above"] + 0.25
    assert same["score"]["mean"] > other["score"]["mean"]
    top = same["top_pairs"][0]
    assert Path(top["image"]).is_file()
    # the best match of a same-patient image is an image of that patient (file names start with the patient id)
    hits = [Path(t["synthetic"]).name[:8] == Path(t["train"]).name[:8] for t in same["top_pairs"]]
    assert sum(hits) >= len(hits) - 1


def test_evaluate_reid_metric_end_to_end(trained, generator_sets, tmp_path, one_thread):
    _, _, out = trained
    result = CliRunner().invoke(app, [
        "evaluate", "--real", str(generator_sets / "train"), "--fake", str(generator_sets / "same"),
        "--train", str(generator_sets / "train"), "--metrics", "reid", "--out", str(tmp_path / "eval.json"),
        "--set", f"reid.weights={out / 'reid.pt'}", "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["reid"]["n_above"] >= 6 and "false-match" in res["reid"]["threshold_rule"]
    assert "Re-ID above threshold" in result.output


def test_reid_without_a_network_is_skipped_with_the_command_to_make_one(generator_sets, tmp_path):
    result = CliRunner().invoke(app, [
        "evaluate", "--real", str(generator_sets / "train"), "--fake", str(generator_sets / "same"), "--metrics", "reid",
        "--out", str(tmp_path / "eval.json"), "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    assert "privacy train-reid" in json.loads((tmp_path / "eval.json").read_text())["skipped"]["reid"]


def test_a_set_without_follow_up_images_cannot_train(tmp_path):
    root = make_fixture_dataset(tmp_path, "nih", n=6, size=32, seed=0, per_patient=1)
    records = load_records(DataConfig(path=root, format="nih", resolution=32))
    with pytest.raises(DataError, match="two or more images"):
        train_reid(records, ReidTrainConfig(**TRAIN), tmp_path / "out")
