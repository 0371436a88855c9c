"""Training the tiny PixArt-Σ: full fine-tuning, DreamBooth and LoRA train 3 steps (the transformer or its
adapters move, T5 and the VAE stay bit-identical), the exported pipeline (LoRA: merged, and a peft adapter
folder) loads in plain diffusers/peft with the pixels `synthcxr generate` makes, and T5 training and a LoRA
file export are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthcxr.errors import ConfigError


@pytest.fixture
def pixart_config(tiny_family_model, train_data):
    from train_helpers import tiny_config_dict

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(**sections):
        return build_config(TrainConfig, tiny_config_dict(tiny_family_model("pixart"), train_data, **sections))

    return make


def _snapshot(models):
    modules = {models.family.denoiser: models.unet, "vae": models.vae, **models.text_encoders}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("method", ["full", "dreambooth", "lora"])
def test_every_method_trains_three_steps(method, pixart_config, tmp_path):
    from synthcxr.train.loop import fit, setup

    cfg = pixart_config(method={"name": method}, train={"max_steps": 3, "checkpoint_every": 3})
    session = setup(cfg, tmp_path / "run")
    before = _snapshot(session.models)
    fit(session)
    after = _snapshot(session.models)
    trainable = set(session.trainable)
    assert {k.split(".")[0] for k in trainable} == {"transformer"}
    assert all(("lora_" in k) == (method == "lora") for k in trainable)
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


def test_lora_exports_merged_and_as_a_peft_folder_with_the_pixels_generate_makes(pixart_config, read_trainable,
                                                                                 tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from PIL import Image

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.models.families import get_family
    from synthcxr.train.loop import train

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")
    run = train(pixart_config(method={"name": "lora"}, optimizer={"lr": 5e-2},
                              train={"max_steps": 3, "checkpoint_every": 3}), tmp_path / "run")
    info = json.loads((run / "synthcxr_model.json").read_text())
    assert info["pipeline"] == "final" and info["lora"] is None and info["merged_adapter"] == "lora"
    assert info["peft_adapter"] == "final/peft_adapter"
    pixart = get_family("pixart").pipeline_cls()

    def gen(out, pipe=None, model=run):
        folder = generate_images(GenerateConfig(model=str(model), prompt="a chest x-ray", n=1, steps=2,
                                                out=tmp_path / out), pipe=pipe)
        return np.asarray(Image.open(folder / "00000.png")).astype(int)

    ours = gen("ours")
    merged = pixart.from_pretrained(str(run / "final"))
    merged.set_progress_bar_config(disable=True)
    assert np.array_equal(gen("merged", merged), ours)
    # the adapter on the untouched base model, through peft alone
    base = str(pixart_config().model.path)
    plain = pixart.from_pretrained(base)
    plain.set_progress_bar_config(disable=True)
    before = gen("base", plain, base)
    plain.transformer = PeftModel.from_pretrained(plain.transformer, str(run / info["peft_adapter"]))
    trained = {k.replace(".default.", "."): v for k, v in read_trainable(run).items()}
    loaded = {"transformer." + n.removeprefix("base_model.model.").replace(".default.", "."): p.detach()
              for n, p in plain.transformer.named_parameters() if "lora_" in n}
    assert set(trained) == set(loaded) and all(torch.equal(loaded[k], v) for k, v in trained.items())
    assert np.abs(gen("peft", plain) - ours).max() <= 1
    assert np.abs(ours - before).max() > 0, "the LoRA did not change the output"


@pytest.mark.parametrize(("method", "match"), [({"name": "lora", "export": "lora_file"}, "no LoRA loader"),
                                               ({"name": "full", "train_text_encoder": True}, "no CLIP text encoder")])
def test_a_lora_file_and_t5_training_are_refused_before_any_work(method, match, pixart_config, tmp_path):
    from synthcxr.train.loop import train

    with pytest.raises(ConfigError, match=match):
        train(pixart_config(method=method), tmp_path / "run")
    assert not (tmp_path / "run").exists()
