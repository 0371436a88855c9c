"""`synthcxr model make-tiny`: a loadable tiny model, offline, and no overwriting."""

from __future__ import annotations

import json

import pytest

from synthcxr.cli import main
from synthcxr.models.load import load_pipeline


def test_make_tiny_builds_a_loadable_v_prediction_model(tmp_path, capsys):
    out = tmp_path / "tiny_v"
    main(["model", "make-tiny", str(out), "--prediction-type", "v_prediction", "--resolution", "32"])
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "synthcxr_tiny.json").read_text())["prediction_type"] == "v_prediction"
    pipe = load_pipeline(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32


@pytest.mark.parametrize(("args", "message"), [
    (["--prediction-type", "x0"], "unknown --prediction-type"),
    (["--resolution", "30"], "multiple of 8"),
])
def test_make_tiny_rejects_bad_options(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "make-tiny", str(tmp_path / "m"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_make_tiny_never_writes_into_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["model", "make-tiny", str(tmp_path)])
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
