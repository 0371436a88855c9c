"""Training the tiny Flux.1: LoRA trains 3 steps (adapters move, the base, CLIP, T5 and VAE stay
bit-identical), the LoRA loads in plain diffusers with the pixels `synthcxr generate` makes, and full
fine-tuning / DreamBooth / T5 training are refused before any work (with the memory they would need)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from synthcxr.errors import ConfigError


@pytest.fixture
def flux_config(tiny_family_model, train_data):
    from train_helpers import tiny_config_dict

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(**sections):
        return build_config(TrainConfig, tiny_config_dict(tiny_family_model("flux"), train_data, **sections))

    return make


def test_lora_trains_three_steps_and_the_base_stays_frozen(flux_config, tmp_path):
    from synthcxr.train.loop import fit, setup

    session = setup(flux_config(method={"name": "lora"}, train={"max_steps": 3, "checkpoint_every": 3}),
                    tmp_path / "run")
    m = session.models
    modules = {"transformer": m.unet, "vae": m.vae, **m.text_encoders}
    before = {f"{k}.{n}": p.detach().clone() for k, mod in modules.items() for n, p in mod.named_parameters()}
    fit(session)
    after = {f"{k}.{n}": p.detach().clone() for k, mod in modules.items() for n, p in mod.named_parameters()}
    trainable = set(session.trainable)
    assert trainable and all(k.startswith("transformer.") and "lora_" in k for k in trainable)
    assert any("ff_context" in k for k in trainable)  # the example's targets, feed-forwards included
    moved = {k for k in trainable if not bool((before[k] == after[k]).all())}
    frozen_moved = [k for k in after if k not in trainable and not bool((before[k] == after[k]).all())]
    assert len(moved) >= 0.9 * len(trainable) and frozen_moved == []
    rows = [r for r in (json.loads(x) for x in session.run.metrics.read_text().splitlines()) if r.get("kind") == "train"]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


def test_lora_loads_in_plain_diffusers_with_the_pixels_generate_makes(flux_config, tiny_family_model, tmp_path,
                                                                    monkeypatch):
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.models.families import get_family
    from synthcxr.train.checkpoint import latest_checkpoint
    from synthcxr.train.loop import train

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")
    run = train(flux_config(method={"name": "lora"}, optimizer={"lr": 5e-2},
                            train={"max_steps": 3, "checkpoint_every": 3}), tmp_path / "run")
    model = str(tiny_family_model("flux"))
    plain = get_family("flux").pipeline_cls().from_pretrained(model)
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
    assert np.abs(px(ours) - px(theirs)).max() <= 1


@pytest.mark.parametrize(("method", "match"), [({"name": "full"}, "190 GB"), ({"name": "dreambooth"}, "190 GB"),
                                               ({"name": "lora", "train_text_encoder": True,
                                                 "text_encoders": ["text_encoder_2"]}, "T5")])
def test_full_dreambooth_and_t5_training_are_refused_before_any_work(method, match, flux_config, tmp_path):
    from synthcxr.train.loop import train

    with pytest.raises(ConfigError, match=match) as err:
        train(flux_config(method=method), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    if method["name"] != "lora":
        assert "method.name=lora" in str(err.value)
