"""Training the tiny PixArt-Σ: full fine-tuning and DreamBooth train 3 steps (the transformer moves,
T5 and the VAE stay bit-identical), the exported pipeline loads in plain diffusers, and LoRA and T5
training are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthcxr.errors import ConfigError


@pytest.fixture
def pixart_config(tiny_family_model, train_data):
    from conftest import tiny_config_dict

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(**sections):
        return build_config(TrainConfig, tiny_config_dict(tiny_family_model("pixart"), train_data, **sections))

    return make


def _snapshot(models):
    modules = {models.family.denoiser: models.unet, "vae": models.vae, **models.text_encoders}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("method", ["full", "dreambooth"])
def test_every_method_trains_three_steps(method, pixart_config, tmp_path):
    from synthcxr.train.loop import fit, setup

    cfg = pixart_config(method={"name": method}, train={"max_steps": 3, "checkpoint_every": 3})
    session = setup(cfg, tmp_path / "run")
    before = _snapshot(session.models)
    fit(session)
    after = _snapshot(session.models)
    trainable = set(session.trainable)
    assert {k.split(".")[0] for k in trainable} == {"transformer"}
    moved = {k for k in trainable if not bool((before[k] == after[k]).all())}
    frozen_moved = [k for k in after if k not in trainable and not bool((before[k] == after[k]).all())]
    assert len(moved) >= 0.9 * len(trainable) and frozen_moved == []
    rows = [r for r in (json.loads(x) for x in session.run.metrics.read_text().splitlines()) if r.get("kind") == "train"]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


def test_full_run_loads_in_plain_diffusers_with_the_pixels_generate_makes(pixart_config, tmp_path, monkeypatch):
    from PIL import Image

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.models.families import get_family
    from synthcxr.train.loop import train

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")
    run = train(pixart_config(method={"name": "full"}, optimizer={"lr": 1e-2},
                              train={"max_steps": 3, "checkpoint_every": 3}), tmp_path / "run")
    info = json.loads((run / "synthcxr_model.json").read_text())
    assert info["family"] == "pixart" and info["pipeline"]
    plain = get_family("pixart").pipeline_cls().from_pretrained(str(run / info["pipeline"]))
    plain.set_progress_bar_config(disable=True)
    ours = generate_images(GenerateConfig(model=str(run), prompt="a chest x-ray", n=1, steps=2, out=tmp_path / "o"))
    theirs = generate_images(GenerateConfig(model=str(run), prompt="a chest x-ray", n=1, steps=2, out=tmp_path / "p"),
                             pipe=plain)
    assert (ours / "00000.png").read_bytes() == (theirs / "00000.png").read_bytes()
    base = generate_images(GenerateConfig(model=str(pixart_config().model.path), prompt="a chest x-ray", n=1, steps=2,
                                          out=tmp_path / "b"))
    px = [np.asarray(Image.open(f / "00000.png")).astype(int) for f in (ours, base)]
    assert np.abs(px[0] - px[1]).max() > 0, "training did not change the model"


@pytest.mark.parametrize(("method", "match"), [({"name": "lora"}, "no LoRA loader"),
                                               ({"name": "full", "train_text_encoder": True}, "no CLIP text encoder")])
def test_lora_and_t5_training_are_refused_before_any_work(method, match, pixart_config, tmp_path):
    from synthcxr.train.loop import train

    with pytest.raises(ConfigError, match=match):
        train(pixart_config(method=method), tmp_path / "run")
    assert not (tmp_path / "run").exists()
