"""Training on the tiny SDXL and SD3 models: every method trains 3 steps (trainable weights move,
frozen ones do not), a LoRA loads in plain diffusers with the pixels `synthcxr generate` makes, and
family-specific bad input fails before any work."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from synthcxr.errors import ConfigError

FAMILY_METHODS = [(f, m) for f in ("sdxl", "sd3") for m in ("lora", "full", "dreambooth")]


@pytest.fixture
def family_config(tiny_family_model, train_data):
    from train_helpers import tiny_config_dict

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(family: str, **sections):
        return build_config(TrainConfig, tiny_config_dict(tiny_family_model(family), train_data, **sections))

    return make


def _snapshot(models):
    modules = {models.family.denoiser: models.unet, "vae": models.vae, **models.text_encoders}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize(("family", "method"), FAMILY_METHODS)
def test_every_method_trains_three_steps(family, method, family_config, tmp_path):
    from synthcxr.train.loop import fit, setup

    train_te = family == "sdxl" and method == "lora"  # both CLIP encoders get adapters too
    cfg = family_config(family, method={"name": method, "train_text_encoder": train_te},
                        train={"max_steps": 3, "checkpoint_every": 3})
    session = setup(cfg, tmp_path / "run")
    before = _snapshot(session.models)
    fit(session)
    after = _snapshot(session.models)
    trainable = set(session.trainable)
    moved = {k for k in trainable if k in before and not bool((before[k] == after[k]).all())}
    frozen_moved = [k for k in after if k not in trainable and k in before and not bool((before[k] == after[k]).all())]
    new = {k for k in trainable if k not in before}  # adapters added after the snapshot's modules existed
    assert len(moved | new) >= 0.9 * len(trainable) and frozen_moved == []
    prefixes = {k.split(".")[0] for k in trainable}
    denoiser = session.models.family.denoiser
    assert prefixes == ({denoiser, "text_encoder", "text_encoder_2"} if train_te else {denoiser})
    rows = [r for r in (json.loads(x) for x in session.run.metrics.read_text().splitlines()) if r.get("kind") == "train"]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_lora_loads_in_plain_diffusers_with_the_pixels_generate_makes(family, family_config, tiny_family_model,
                                                                    tmp_path, monkeypatch):
    import torch

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.models.families import get_family
    from synthcxr.train.loop import train

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")
    cfg = family_config(family, method={"name": "lora", "train_text_encoder": True}, optimizer={"lr": 5e-2},
                        train={"max_steps": 3, "checkpoint_every": 3})
    run = train(cfg, tmp_path / "run")
    info = json.loads((run / "synthcxr_model.json").read_text())
    assert info["family"] == family and info["lora"] == "final/pytorch_lora_weights.safetensors"

    fam = get_family(family)
    plain = fam.pipeline_cls().from_pretrained(str(tiny_family_model(family)))
    plain.set_progress_bar_config(disable=True)
    base = generate_images(GenerateConfig(model=str(tiny_family_model(family)), prompt="a chest x-ray", n=1, steps=2,
                                          out=tmp_path / "base"), pipe=plain)
    plain.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        ours = generate_images(GenerateConfig(model=str(run), prompt="a chest x-ray", n=1, steps=2,
                                              out=tmp_path / "ours"))
    theirs = generate_images(GenerateConfig(model=str(run), prompt="a chest x-ray", n=1, steps=2,
                                            out=tmp_path / "plain"), pipe=plain)

    def px(folder):
        from PIL import Image

        return np.asarray(Image.open(folder / "00000.png")).astype(int)

    assert np.abs(px(theirs) - px(base)).max() > 0, "the LoRA file did not change the output"
    # every trained adapter weight arrived in plain diffusers' pipeline, unchanged (not only some of them)
    from safetensors.torch import load_file

    from synthcxr.train.checkpoint import latest_checkpoint

    trained = load_file(str(latest_checkpoint(run / "checkpoints") / "trainable.safetensors"))
    loaded = {}
    for attr in (fam.denoiser, "text_encoder", "text_encoder_2"):
        for name, param in getattr(plain, attr).named_parameters():
            if "lora_" in name:
                loaded[f"{attr}." + re.sub(r"\.default(_\d+)?\.", ".", name)] = param.detach()
    assert {k.replace(".default.", ".") for k in trained} == set(loaded)
    for key, value in trained.items():
        assert torch.equal(loaded[key.replace(".default.", ".")].float(), value.float()), key
    # ours fuses the LoRA into the weights (faster sampling); equal up to one 8-bit level of rounding
    assert np.abs(px(ours) - px(theirs)).max() <= 1


def test_t5_text_encoder_training_is_refused_before_any_work(family_config, tmp_path):
    from synthcxr.train.loop import train

    cfg = family_config("sd3", method={"name": "lora", "train_text_encoder": True,
                                       "text_encoders": ["text_encoder", "text_encoder_3"]})
    with pytest.raises(ConfigError, match="T5 encoder, which cannot be trained"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_min_snr_on_flow_matching_is_refused(family_config, tmp_path):
    from synthcxr.train.loop import train

    with pytest.raises(ConfigError, match="min_snr_gamma"):
        train(family_config("sd3", train={"min_snr_gamma": 5.0}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resolution_not_a_multiple_of_vae_factor_times_patch_is_refused(tmp_path, train_data):
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.family_checks import check_family_config

    # an SD3.5-shaped folder (configs only): VAE x8, patch 2 -> multiples of 16
    model = tmp_path / "sd35"
    (model / "vae").mkdir(parents=True)
    (model / "transformer").mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (model / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2}))
    cfg = build_config(TrainConfig, {"model": {"path": str(model)}, "data": {"path": str(train_data), "resolution": 520}})
    with pytest.raises(ConfigError, match="not a multiple of 16") as err:
        check_family_config(cfg)
    assert "512" in str(err.value)
    ok = build_config(TrainConfig, {"model": {"path": str(model)}, "data": {"path": str(train_data), "resolution": 512}})
    assert check_family_config(ok).name == "sd3"


def test_unknown_family_in_config_lists_the_supported(train_data, tiny_model_dir):
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    with pytest.raises(ConfigError, match="sdxl"):
        build_config(TrainConfig, {"model": {"path": str(tiny_model_dir), "family": "sdx"},
                                   "data": {"path": str(train_data)}})


def test_flow_matching_resume_is_exact(family_config, tmp_path, read_trainable):
    """SD3 (flow matching draws) continues bit-identically: 2 steps + resume to 3 == 3 steps straight."""
    import torch

    from synthcxr.train.loop import train

    straight = train(family_config("sd3", train={"max_steps": 3}), tmp_path / "straight")
    first = train(family_config("sd3", train={"max_steps": 2}), tmp_path / "resumed")
    (first / "DONE").unlink()  # a finished run is left alone; without DONE a longer max_steps continues it
    resumed = train(family_config("sd3", train={"max_steps": 3}), tmp_path / "resumed", resume=True)
    a, b = read_trainable(straight), read_trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sd3_without_t5_trains_and_generates_like_diffusers(family_config, tiny_family_model, tmp_path, monkeypatch):
    """model.drop_t5: T5 is never loaded; its tokens are zeros, as StableDiffusion3Pipeline does with
    text_encoder_3=None. The run records it, so generate from the run drops T5 too and gives the pixels
    of plain diffusers with text_encoder_3=None and the LoRA."""
    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.models.families import get_family
    from synthcxr.train.loop import finish, fit, setup

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")
    cfg = family_config("sd3", model={"drop_t5": True}, method={"name": "lora"}, optimizer={"lr": 5e-2},
                        train={"max_steps": 2, "checkpoint_every": 2})
    session = setup(cfg, tmp_path / "run")
    assert not any(p.numel() for p in session.models.text_encoders["text_encoder_3"].parameters())
    fit(session)
    run = finish(session)
    assert json.loads((run / "synthcxr_model.json").read_text())["drop_t5"] is True

    ours = generate_images(GenerateConfig(model=str(run), prompt="a chest x-ray", n=1, steps=2, out=tmp_path / "ours"))
    plain = get_family("sd3").pipeline_cls().from_pretrained(str(tiny_family_model("sd3")), text_encoder_3=None,
                                                             tokenizer_3=None)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    theirs = generate_images(GenerateConfig(model=str(tiny_family_model("sd3")), prompt="a chest x-ray", n=1,
                                            steps=2, out=tmp_path / "theirs"), pipe=plain)
    from PIL import Image

    a, b = (np.asarray(Image.open(folder / "00000.png")).astype(int) for folder in (ours, theirs))
    assert np.abs(a - b).max() <= 1  # ours fuses the LoRA: equal up to one 8-bit level


def test_drop_t5_on_a_family_without_optional_t5_fails_before_any_work(family_config, tmp_path):
    from synthcxr.train.loop import train

    with pytest.raises(ConfigError, match="drop_t5.*no T5 text encoder to drop"):
        train(family_config("sdxl", model={"drop_t5": True}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_frozen_text_encoders_leave_the_device_once_prompts_are_cached(family_config, tmp_path, monkeypatch):
    """With the text cache on and no text encoder training, every caption is encoded once; the encoders
    are then parked in CPU memory (off the GPU) and training never runs them. Validation brings them back
    for its prompts and parks them again; with encoder training nothing is parked."""
    from synthcxr.train import loop

    parked: list[list[str]] = []
    real_park = loop._park

    def spy(encoders):
        encoders = list(encoders)
        parked.append(sorted(type(e).__name__ for e in encoders))
        real_park(encoders)

    monkeypatch.setattr(loop, "_park", spy)
    cfg = family_config("sd3", train={"max_steps": 2, "checkpoint_every": 2, "cache_latents": "ram",
                                      "validate_every": 2})
    session = loop.setup(cfg, tmp_path / "run")
    names = sorted(type(e).__name__ for e in session.models.text_encoders.values())
    assert session.encoders_parked and parked == [names]
    calls = []
    for encoder in session.models.text_encoders.values():
        encoder.register_forward_hook(lambda *a: calls.append(1))
    loop.fit(session)
    loop.finish(session)
    assert len(parked) >= 2 and parked[-1] == names  # validation brought them back, then parked them again
    assert len(calls) <= 3  # validation's prompts only (once); no training step ran an encoder

    trained = family_config("sd3", method={"train_text_encoder": True},
                            train={"max_steps": 1, "cache_latents": "ram"})
    assert not loop.setup(trained, tmp_path / "run2").encoders_parked


def test_vae_tiling_and_slicing_options(family_config, tmp_path):
    """train.vae_tiling / train.vae_slicing turn on diffusers' tiled and sliced VAE (1024 px latents on a
    small GPU); tiled latents differ slightly, so the latent cache is keyed on the setting."""
    from synthcxr.train import loop

    session = loop.setup(family_config("sd3", train={"max_steps": 1, "vae_tiling": True, "vae_slicing": True}),
                         tmp_path / "run")
    assert session.models.vae.use_tiling and session.models.vae.use_slicing


def test_sd3_full_fine_tune_without_t5_exports_a_pipeline_without_it(family_config, tmp_path):
    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.train.loop import train

    run = train(family_config("sd3", model={"drop_t5": True}, method={"name": "full"},
                              train={"max_steps": 1, "checkpoint_every": 1}), tmp_path / "run")
    index = json.loads((run / "final" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not (run / "final" / "text_encoder_3").exists()
    out = generate_images(GenerateConfig(model=str(run), prompt="a chest x-ray", n=1, steps=2, out=tmp_path / "g"))
    assert (out / "00000.png").is_file()
