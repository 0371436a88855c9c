"""peft adapters besides LoRA (LoHa, LoKr, OFT): each trains on the tiny model, leaves the base weights
alone, and exports a merged pipeline that plain diffusers loads and that draws the validation samples'
pixels. Asking for a LoRA file of an adapter diffusers cannot load fails at config load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from synthcxr.errors import ConfigError
from synthcxr.fileio import read_jsonl

ADAPTER_KEYS = {"loha": "hada_", "lokr": "lokr_", "oft": "oft_", "lora": "lora_"}


def _snapshot(session):
    modules = {"unet": session.models.unet, "vae": session.models.vae, "text_encoder": session.models.text_encoder}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


def _sample(pipe, prompt, seed, cfg):
    """What validation.sample_images draws, through a plain pipeline."""
    image = pipe(prompt, num_inference_steps=cfg.train.validation_steps, guidance_scale=cfg.train.validation_guidance,
                 generator=torch.Generator().manual_seed(seed), height=cfg.data.resolution,
                 width=cfg.data.resolution).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(("method", "export"), [("loha", "auto"), ("lokr", "auto"), ("oft", "auto"), ("lora", "merged")])
def test_adapter_trains_and_its_merged_export_draws_the_same_pixels(method, export, make_config, tiny_model_dir,
                                                                   tmp_path):
    import json

    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from synthcxr.models.load import load_pipeline
    from synthcxr.train.loop import finish, fit, setup

    prompt = "a chest x-ray"
    cfg = make_config(method={"name": method, "export": export, "train_text_encoder": method == "lokr"},
                      optimizer={"lr": 2e-2},
                      train={"max_steps": 3, "validation_seeds": [0], "validation_prompts": [prompt],
                             "validation_steps": 2})
    session = setup(cfg, tmp_path / "run")
    before = _snapshot(session)
    fit(session)
    after = _snapshot(session)
    trainable = set(session.trainable)
    assert trainable and all(ADAPTER_KEYS[method] in k for k in trainable)
    assert any(k.startswith("text_encoder.") for k in trainable) == (method == "lokr")
    moved = {k for k in trainable if not torch.equal(before[k], after[k])}
    assert len(moved) >= 0.9 * len(trainable), f"only {len(moved)}/{len(trainable)} adapter tensors changed"
    assert [k for k in before if k not in trainable and not torch.equal(before[k], after[k])] == []
    losses = [r["loss"] for r in read_jsonl(session.run.metrics) if r.get("kind") == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    run = finish(session)
    info = json.loads((run / "synthcxr_model.json").read_text())
    assert info["pipeline"] == "final" and info["lora"] is None and info["merged_adapter"] == method
    sample = np.asarray(Image.open(run / "samples" / "step_00003" / "p00_seed0.png"), dtype=np.int16)

    plain = StableDiffusionPipeline.from_pretrained(str(run / "final"), safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    assert not any("hada" in n or "lokr" in n or "oft" in n or "lora" in n for n, _ in plain.unet.named_parameters())
    merged = _sample(plain, prompt, 0, cfg)
    assert np.abs(merged - sample).max() <= 2, "the merged export does not draw what validation drew"
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    base.set_progress_bar_config(disable=True)
    assert np.abs(_sample(base, prompt, 0, cfg) - merged).max() > 2, "training did not change the pictures"
    via_run = load_pipeline(run)  # what `synthcxr generate --model RUN_DIR` uses
    assert np.abs(_sample(via_run, prompt, 0, cfg) - merged).max() <= 2


@pytest.mark.parametrize("method", ["loha", "lokr", "oft", "full"])
def test_lora_file_export_of_an_adapter_diffusers_cannot_load_fails_at_load(method, tmp_path):
    from synthcxr.train.config import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text(f"method: {{name: {method}, export: lora_file}}\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    msg = " ".join(str(err.value).split())
    assert "method.export=lora_file" in msg and "c.yaml" in msg
    if method != "full":
        assert "load_lora_weights" in msg and "method.export=merged" in msg


def test_cli_refuses_a_lokr_lora_file_before_any_work(tiny_model_dir, train_data, tmp_path, capsys):
    from synthcxr.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{path: {train_data}}}\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "--set", "method.name=lokr", "--set", "method.export=lora_file", "--out", str(out)])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "method.export" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(("section", "words"), [
    ({"name": "boft"}, ["boft is not offered", "method.name=oft"]),
    ({"name": "loha", "dora": True}, ["dora is a LoRA variant"]),
    ({"name": "full", "export": "merged"}, ["no adapters to merge"]),
    ({"name": "lokr", "decompose_factor": -3}, ["method.decompose_factor"]),
])
def test_bad_adapter_settings_fail_at_load(section, words):
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, {"method": section})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_oft_block_size_that_does_not_divide_a_layer_is_a_clear_error(make_config, tmp_path):
    from synthcxr.train.loop import setup

    with pytest.raises(ConfigError) as err:
        setup(make_config(method={"name": "oft", "block_size": 7}), tmp_path / "run")
    assert "method.block_size" in str(err.value)
