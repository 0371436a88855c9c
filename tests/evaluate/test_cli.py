"""`synthcxr evaluate` end to end: JSON, table, cache reuse, and clear errors."""

from __future__ import annotations

import json

import pytest

from synthcxr.cli import main
from synthcxr.evaluate.commands import results_rows
from synthcxr.evaluate.run import EvaluateConfig, evaluate

FAST = ["--extractor", "random", "--set", "diversity.image_size=64", "--set", "diversity.pairs=20",
        "--set", "utility.image_size=32", "--set", "utility.epochs=1", "--set", "memorization.ssim_size=32",
        "--set", "fidelity.ci_groups=10", "--set", "fidelity.kid_subsets=10", "--set", "utility.n_boot=20",
        "--set", "utility.seeds=2"]


def test_cli_writes_json_and_prints_table_then_reuses_cached_features(image_sets, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["evaluate", "--real", str(image_sets["real"]), "--fake", str(image_sets["fake"]),
            "--test", str(image_sets["test"]), "--out", str(out), *FAST]
    main(args)
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for label in ("FID", "KID", "Precision", "Coverage", "MS-SSIM synthetic", "AUC trained on real"):
        assert label in printed
    assert res["extractor"]["name"] == "random" and "bicubic" in res["extractor"]["resize"]
    assert res["features"]["fake"] == {"computed": 14, "cached": 0}
    assert res["fidelity"]["n_real"] == 16 and res["fidelity"]["n_fake"] == 14
    assert len(res["fidelity"]["fid"]["ci"]) == 2 and res["fidelity"]["kid"]["subsets"] == 10
    assert res["diversity"]["synthetic"]["n_pairs"] == 20
    assert res["memorization"]["n_synthetic"] == 14 and res["memorization"]["train_source"] == "real"
    assert res["utility"]["split"]["source"] == "given --test set" and "synthetic" in res["utility"]
    assert any("KID" in w for w in res["warnings"])
    assert (tmp_path / "eval_split.json").is_file() and list((tmp_path / "eval_pairs").glob("pair_*.png"))

    # a new synthetic set against the same real set: real features come from the cache
    # (not the --test images: the first run featurized them as memorization hold-outs)
    from .conftest import make_images

    out2 = tmp_path / "eval2.json"
    main(["evaluate", "--real", str(image_sets["real"]), "--fake", str(make_images(tmp_path / "new", 8, seed=9)),
          "--out", str(out2), "--metrics", "fidelity", *FAST])
    res2 = json.loads(out2.read_text())
    assert res2["features"]["real"] == {"computed": 0, "cached": 16}
    assert res2["features"]["fake"]["computed"] == 8
    assert set(res2) >= {"fidelity"} and "utility" not in res2


def test_evaluate_api_skips_utility_without_labels(tmp_path):
    from .conftest import make_images

    real = make_images(tmp_path / "real", 8, seed=1)  # flat folder: no labels
    fake = make_images(tmp_path / "fake", 8, seed=2)
    cfg = EvaluateConfig(real=real, fake=fake, out=tmp_path / "e.json", metrics=["fidelity", "utility"],
                         extractor={"name": "random", "device": "cpu"}, fidelity={"bootstrap": 5, "kid_subsets": 5})
    res = evaluate(cfg)
    assert "utility" in res["skipped"] and "labels" in res["skipped"]["utility"]
    assert [r[0] for r in results_rows(res)][:2] == ["FID", "KID"]
    assert json.loads((tmp_path / "e.json").read_text())["skipped"] == res["skipped"]


@pytest.mark.parametrize("case", ["empty", "too_few", "unreadable", "bad_key"])
def test_cli_bad_inputs_give_one_clear_message(case, tmp_path, capsys):
    from .conftest import make_images

    real = make_images(tmp_path / "real", 8, seed=1)
    fake = tmp_path / "fake"
    extra: list[str] = []
    if case == "empty":
        fake.mkdir()
        expected = "no PNG/JPEG/DICOM images found for fake"
    elif case == "too_few":
        make_images(fake, 3, seed=2)
        expected = "needs at least 6 synthetic images"
    elif case == "unreadable":
        make_images(fake, 8, seed=2)
        (fake / "bad.png").write_bytes(b"\x89PNG broken")
        expected = "bad.png"
    else:
        make_images(fake, 8, seed=2)
        extra = ["--set", "fidelity.kid_subset=10"]
        expected = "did you mean 'fidelity.kid_subsets'"
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--real", str(real), "--fake", str(fake), "--out", str(tmp_path / "e.json"),
              "--metrics", "fidelity", "--extractor", "random", *extra])
    assert info.value.code == 2
    err = capsys.readouterr()
    text = " ".join((err.out + err.err).split())
    assert expected in text and "Traceback" not in text
    assert not (tmp_path / "e.json").exists()
