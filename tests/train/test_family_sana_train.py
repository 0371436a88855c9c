"""Training the tiny Sana: LoRA, full fine-tuning and DreamBooth train 3 steps (trainable weights move,
Gemma-2 and DC-AE stay bit-identical), a LoRA loads in plain diffusers with the pixels `synthcxr
generate` makes, and Gemma training or a resolution DC-AE cannot take fail before any work."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from synthcxr.errors import ConfigError


@pytest.fixture
def sana_config(tiny_family_model, train_data):
    from train_helpers import tiny_config_dict

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(**sections):
        return build_config(TrainConfig, tiny_config_dict(tiny_family_model("sana"), train_data, **sections))

    return make


def _snapshot(models):
    modules = {models.family.denoiser: models.unet, "vae": models.vae, **models.text_encoders}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "full", "dreambooth"])
def test_every_method_trains_three_steps(method, sana_config, tmp_path):
    from synthcxr.train.loop import fit, setup

    session = setup(sana_config(method={"name": method}, train={"max_steps": 3, "checkpoint_every": 3}),
                    tmp_path / "run")
    before = _snapshot(session.models)
    fit(session)
    after = _snapshot(session.models)
    trainable = set(session.trainable)
    assert {k.split(".")[0] for k in trainable} == {"transformer"}
    moved = {k for k in trainable if k in before and not bool((before[k] == after[k]).all())}
    new = {k for k in trainable if k not in before}
    frozen_moved = [k for k in after if k not in trainable and k in before and not bool((before[k] == after[k]).all())]
    assert len(moved | new) >= 0.9 * len(trainable) and frozen_moved == []
    if method == "lora":
        assert all("lora_" in k for k in trainable)
    rows = [r for r in (json.loads(x) for x in session.run.metrics.read_text().splitlines()) if r.get("kind") == "train"]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


def test_lora_loads_in_plain_diffusers_with_the_pixels_generate_makes(sana_config, tiny_family_model, tmp_path,
                                                                    monkeypatch):
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.models.families import get_family
    from synthcxr.train.checkpoint import latest_checkpoint
    from synthcxr.train.loop import train

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")
    run = train(sana_config(method={"name": "lora"}, optimizer={"lr": 5e-2},
                            train={"max_steps": 3, "checkpoint_every": 3}), tmp_path / "run")
    info = json.loads((run / "synthcxr_model.json").read_text())
    assert info["family"] == "sana" and info["lora"] == "final/pytorch_lora_weights.safetensors"
    model = str(tiny_family_model("sana"))
    plain = get_family("sana").pipeline_cls().from_pretrained(model)
    plain.set_progress_bar_config(disable=True)
    base = generate_images(GenerateConfig(model=model, prompt="a chest x-ray", n=1, steps=2, out=tmp_path / "b"),
                           pipe=plain)
    plain.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    ours = generate_images(GenerateConfig(model=str(run), prompt="a chest x-ray", n=1, steps=2, out=tmp_path / "o"))
    theirs = generate_images(GenerateConfig(model=str(run), prompt="a chest x-ray", n=1, steps=2, out=tmp_path / "p"),
                             pipe=plain)

    def px(folder):
        return np.asarray(Image.open(folder / "00000.png")).astype(int)

    assert np.abs(px(theirs) - px(base)).max() > 0, "the LoRA file did not change the output"
    trained = load_file(str(latest_checkpoint(run / "checkpoints") / "trainable.safetensors"))
    loaded = {"transformer." + re.sub(r"\.default(_\d+)?\.", ".", n): p.detach()
              for n, p in plain.transformer.named_parameters() if "lora_" in n}
    assert {k.replace(".default.", ".") for k in trained} == set(loaded)
    assert all(torch.equal(loaded[k.replace(".default.", ".")].float(), v.float()) for k, v in trained.items())
    assert np.abs(px(ours) - px(theirs)).max() <= 1  # ours fuses the LoRA: one 8-bit level of rounding at most


def test_gemma_training_is_refused_before_any_work(sana_config, tmp_path):
    from synthcxr.train.loop import train

    with pytest.raises(ConfigError, match="no CLIP text encoder"):
        train(sana_config(method={"name": "lora", "train_text_encoder": True}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resolution_must_be_a_multiple_of_the_dc_ae_factor(tmp_path, train_data):
    """A Sana-1024-shaped folder (configs only): DC-AE x32, patch 1 -> multiples of 32; 512 and 1024 pass."""
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.family_checks import check_family_config

    model = tmp_path / "sana"
    (model / "vae").mkdir(parents=True)
    (model / "transformer").mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    (model / "vae" / "config.json").write_text(json.dumps({"encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024]}))
    (model / "transformer" / "config.json").write_text(json.dumps({"patch_size": 1}))

    def cfg(resolution):
        return build_config(TrainConfig, {"model": {"path": str(model)},
                                          "data": {"path": str(train_data), "resolution": resolution}})

    with pytest.raises(ConfigError, match="not a multiple of 32"):
        check_family_config(cfg(528))
    assert check_family_config(cfg(512)).name == "sana" and check_family_config(cfg(1024)).name == "sana"

