"""`study create` records every group's source size and framing, refuses enlargement unless asked,
and measures how well simple file features separate real from each model (the leak check)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from study_helpers import make_image_folder, run_cli

from synthcxr.errors import StudyError
from synthcxr.study.db import Study, session_scope
from synthcxr.study.leakcheck import FEATURES, LEAK_AUC_WARN, auc
from synthcxr.study.service import create_study, study_status

N = 24  # per group: enough that matching groups stay well below the warning threshold by chance


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    return {
        "real": make_image_folder(tmp_path / "real", N, 64, seed=1),
        "same": make_image_folder(tmp_path / "same", N, 64, seed=5, manifest=True),  # same process, same size
        "small": make_image_folder(tmp_path / "small", N, 16, seed=6, manifest=True),  # must be enlarged to 64
    }


def _create(tmp_path, folders, model: str, **kw):
    return create_study(f"sqlite:///{tmp_path / 'db.sqlite3'}", f"s-{model}", real=folders["real"],
                        models=[f"{model}={folders[model]}"], per_model=None, real_count=None, readers=1,
                        study_dir=tmp_path / "sd", **kw)


def test_auc_is_the_separation_in_either_direction():
    assert auc([1, 2, 3], [4, 5, 6]) == 1.0 == auc([4, 5, 6], [1, 2, 3])
    assert auc([1, 2, 3, 4], [1, 2, 3, 4]) == 0.5
    assert auc([1, 3], [2, 4]) == 0.75


def test_enlargement_is_refused_before_anything_is_written(tmp_path, folders):
    with pytest.raises(StudyError) as err:
        _create(tmp_path, folders, "small", image_size=64)
    message = str(err.value)
    assert "'small'" in message and "16x16" in message and "enlarged" in message
    assert "--allow-enlarge" in message and "--image-size 16" in message
    assert study_status(f"sqlite:///{tmp_path / 'db.sqlite3'}") == []
    assert not any((tmp_path / "sd").rglob("*.png"))


def test_allowed_enlargement_warns_and_the_leak_check_sees_it(tmp_path, folders, caplog):
    with caplog.at_level(logging.WARNING, logger="synthcxr"):
        created = _create(tmp_path, folders, "small", image_size=64, allow_enlarge=True)
    info = created.blinding
    assert info["image_size"] == 64
    assert info["groups"]["small"]["sizes"] == {"16x16": N} and info["groups"]["small"]["enlarged"] == N
    assert info["groups"]["real"]["enlarged"] == 0
    leak = info["leak_check"]["models"]["small"]
    assert set(leak["auc"]) == set(FEATURES)
    assert leak["max_auc"] > LEAK_AUC_WARN and leak["p_value"] < 0.01  # not chance
    logged = caplog.text
    assert "enlarged" in logged and "leak check" in logged and "'small'" in logged
    assert any("enlarged" in w for w in created.warnings) and any("leak check" in w for w in created.warnings)
    with session_scope(f"sqlite:///{tmp_path / 'db.sqlite3'}") as s:
        assert s.scalar(select(Study.blinding)) == info  # stored with the study


def test_matching_images_pass_the_leak_check(tmp_path, folders, caplog):
    with caplog.at_level(logging.WARNING, logger="synthcxr"):
        created = _create(tmp_path, folders, "same", image_size=64)
    leak = created.blinding["leak_check"]["models"]["same"]
    assert leak["n_real"] == N and leak["n_model"] == N
    assert leak["max_auc"] <= LEAK_AUC_WARN and leak["p_value"] >= 0.05, leak
    assert created.warnings == [] and "leak" not in caplog.text
    assert created.blinding["groups"]["same"] == {**created.blinding["groups"]["same"], "enlarged": 0, "padded": 0}


def test_default_size_is_the_smallest_side_so_nothing_is_enlarged(tmp_path, folders):
    created = _create(tmp_path, folders, "small")
    assert created.blinding["image_size"] == 16
    assert all(g["enlarged"] == 0 for g in created.blinding["groups"].values())


def test_framing_records_padding_bars(tmp_path, folders):
    padded = tmp_path / "padded"
    padded.mkdir()
    rng = np.random.default_rng(9)
    for i in range(N):  # what a model trained on `data.resize: pad` makes: black bars top and bottom
        arr = (rng.uniform(0.3, 0.9, (64, 64)) * 255).astype(np.uint8)
        arr[:10] = 0
        arr[-10:] = 0
        Image.fromarray(arr).save(padded / f"{i:03d}.png")
    folders["padded"] = padded
    created = _create(tmp_path, folders, "padded", image_size=64)
    groups = created.blinding["groups"]
    assert groups["padded"]["padded"] == N and groups["real"]["padded"] == 0
    assert created.blinding["leak_check"]["models"]["padded"]["auc"]["border_mean"] > LEAK_AUC_WARN


def test_cli_prints_sizes_and_the_leak_check(tmp_path, folders, capsys):
    db = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    base = ["study", "create", "--name", "c", "--real", str(folders["real"]), "--model", f"small={folders['small']}",
            "--per-model", str(N), "--real-count", str(N), "--readers", "1", "--image-size", "64",
            "--dir", str(tmp_path / "sd"), "--db", db]
    from synthcxr.cli import main

    with pytest.raises(SystemExit) as exc:
        main(base)
    assert exc.value.code != 0 and "--allow-enlarge" in capsys.readouterr().err
    out = run_cli([*base, "--allow-enlarge"], capsys)
    assert "small: 24 images, 16x16 (24), 24 enlarged" in out
    assert "leak check" in out and "small" in out and "max AUC" in out and "WARNING" in out


def test_the_permutation_p_value_tells_chance_from_a_leak():
    from synthcxr.study.leakcheck import leak_check

    rng = np.random.default_rng(0)

    def rows(shift: float, n: int) -> list[dict[str, float]]:
        return [{f: float(rng.normal(shift, 1)) for f in FEATURES} for _ in range(n)]

    leak = leak_check({"real": rows(0, 8), "m": rows(3, 8)})["models"]["m"]
    assert leak["max_auc"] == 1.0 and leak["p_value"] < 0.01
    # 8 vs 8 from one distribution: the max AUC often passes 0.75, p < 0.05 only about 5% of the time
    null = [leak_check({"real": rows(0, 8), "m": rows(0, 8)})["models"]["m"] for _ in range(60)]
    over = np.mean([r["max_auc"] > LEAK_AUC_WARN for r in null])
    significant = np.mean([r["p_value"] < 0.05 for r in null])
    assert over > 0.2 and significant <= 0.12, (over, significant)


SHENZHEN = Path(__file__).resolve().parents[3] / "shared" / "data" / "ChinaSet_AllFiles" / "CXR_png"


@pytest.mark.skipif(not SHENZHEN.is_dir(), reason="needs the real Shenzhen sample in ../shared/data")
def test_leak_check_on_real_radiographs(tmp_path):
    """Half the real sample as 'real', the other half as a model (same label mix): no warning; the
    same half shrunk to 128 px and enlarged back to 512: separated, and not by chance."""
    files = sorted(SHENZHEN.glob("*.png"))
    if len(files) < 8:
        pytest.skip("fewer than 8 Shenzhen images")
    real, twin, shrunk = (tmp_path / n for n in ("real", "twin", "shrunk"))
    for folder in (real, twin, shrunk):
        folder.mkdir()
    for i, path in enumerate(files):
        if i % 2 == 0:
            Image.open(path).save(real / path.name)
        else:
            Image.open(path).save(twin / path.name)
            Image.open(path).convert("L").resize((128, 128), Image.Resampling.LANCZOS).save(shrunk / path.name)
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    kw = {"real": real, "per_model": None, "real_count": None, "readers": 1, "image_size": 512, "study_dir": tmp_path / "sd"}
    same = create_study(db, "twin", models=[f"twin={twin}"], **kw).blinding["leak_check"]["models"]["twin"]
    assert same["max_auc"] <= LEAK_AUC_WARN or same["p_value"] >= 0.05, same
    with pytest.raises(StudyError, match="--allow-enlarge"):
        create_study(db, "shrunk", models=[f"shrunk={shrunk}"], **kw)
    created = create_study(db, "shrunk", models=[f"shrunk={shrunk}"], allow_enlarge=True, **kw)
    leak = created.blinding["leak_check"]["models"]["shrunk"]
    assert leak["max_auc"] > LEAK_AUC_WARN and leak["p_value"] < 0.05, leak
