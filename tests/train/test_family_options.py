"""The training behaviours users rely on, checked on every family's tiny model: the held-out loss at fixed
timesteps/sigmas and noise is the same on every run, the latent/text caches give the losses of encoding
every step, EMA smooths the exported weights without changing training, and `--set` overrides reach the run."""

from __future__ import annotations

import pytest
import torch

from synthcxr.fileio import read_jsonl

FAMILIES = ["sd", "sdxl", "sd3", "pixart", "sana", "flux"]
METHOD = {"sd": "lora", "sdxl": "lora", "sd3": "lora", "pixart": "full", "sana": "full", "flux": "lora"}
QUICK = {"sd3"}  # one flow-matching family in the quick suite; the rest run with the slow tests


def _families(quick=QUICK):
    return [pytest.param(f, marks=() if f in quick else pytest.mark.slow) for f in FAMILIES]


@pytest.fixture
def family_config(tiny_family_model, train_data):
    from train_helpers import tiny_config_dict

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(family: str, **sections):
        sections.setdefault("method", {})
        sections["method"] = {"name": METHOD[family], **sections["method"]}
        return build_config(TrainConfig, tiny_config_dict(tiny_family_model(family), train_data, **sections))

    return make


def _losses(run):
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "train"]


@pytest.mark.parametrize("family", _families())
def test_validation_loss_depends_only_on_the_weights_and_held_out_images(family, family_config, tmp_path):
    """Fixed timesteps (sigmas for flow matching) and fixed noise: another training seed, batch size or
    cache setting scores the same weights identically; other validation timesteps give another loss."""
    from synthcxr.train.loop import setup

    def val_loss(name, timesteps=(100, 500, 900), **train):
        cfg = family_config(family, data={"split": {"val": 0.25, "test": 0.0}},
                            train={"validation_timesteps": list(timesteps), **train})
        return setup(cfg, tmp_path / name).validate(0)["val_loss"]

    first = val_loss("a")
    assert first is not None and first > 0
    assert val_loss("b", seed=7, batch_size=3, cache_latents="ram") == first  # (text encoders parked, then back)
    assert val_loss("c", timesteps=(100, 500, 990)) != first


@pytest.mark.parametrize("family", _families())
def test_cached_latents_and_prompts_give_the_losses_of_encoding_every_step(family, family_config, tmp_path):
    """cache_latents ram and disk (with horizontal flips) give the uncached run's losses; both caches the same."""
    from synthcxr.train.loop import train

    runs = {kind: train(family_config(family, data={"hflip": True},
                                      train={"max_steps": 2, "cache_latents": kind, "cache_dir": str(tmp_path / "c")}),
                        tmp_path / kind)
            for kind in ("none", "ram", "disk")}
    assert any((tmp_path / "c").glob("latents-*.pt")) and any((tmp_path / "c").glob("text-*.pt"))
    assert _losses(runs["ram"]) == _losses(runs["disk"])
    assert _losses(runs["none"]) == pytest.approx(_losses(runs["ram"]), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", _families())
def test_ema_smooths_the_export_and_leaves_training_alone(family, family_config, read_trainable, tmp_path):
    """With EMA the training trajectory (losses, checkpointed weights) is the plain run's; the exported and
    validated weights are the EMA average."""
    from synthcxr.train.loop import finish, fit, setup, train

    plain = train(family_config(family, train={"max_steps": 2}), tmp_path / "plain")
    session = setup(family_config(family, train={"max_steps": 2, "ema": True, "ema_decay": 0.5}), tmp_path / "ema")
    fit(session)
    shadow = [p.detach().clone() for p in session.ema.shadow_params]
    ema_run = finish(session)
    assert _losses(ema_run) == _losses(plain)
    raw, plain_raw = read_trainable(ema_run), read_trainable(plain)
    assert all(torch.equal(raw[k], plain_raw[k]) for k in plain_raw)
    # finish() exports the EMA weights: what the session holds now is the shadow, not the raw weights
    for (name, param), average in zip(session.trainable.items(), shadow, strict=True):
        assert torch.equal(param.detach().cpu(), average.cpu()), name
    moved = [k for k, p in session.trainable.items() if not torch.equal(p.detach().cpu(), raw[k])]
    assert len(moved) >= 0.5 * len(raw)
    from safetensors.torch import load_file

    exported = sorted((ema_run / "final").rglob("*.safetensors"))
    assert exported and any(
        not torch.equal(a, b)
        for f in exported
        for a, b in zip(load_file(str(f)).values(), load_file(str(plain / f.relative_to(ema_run))).values(),
                        strict=True))


@pytest.mark.parametrize("family", _families())
def test_cli_set_overrides_reach_the_run(family, tiny_family_model, train_data, tmp_path, capsys):
    import yaml

    from synthcxr.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_family_model(family))},
        "data": {"path": str(train_data), "resolution": 64, "split": {"val": 0.0, "test": 0.0}},
        "method": {"name": METHOD[family]}, "train": {"validation_seeds": [], "max_steps": 5}}))
    out = tmp_path / "run"
    main(["train", str(config), "--set", "train.max_steps=1", "--set", "data.resolution=32",
          "--set", "optimizer.lr=2e-4", "--out", str(out)])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 1 and saved["data"]["resolution"] == 32 and saved["optimizer"]["lr"] == 2e-4
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"] == [1]
    assert (out / "DONE").exists()
    with pytest.raises(SystemExit):
        main(["train", str(config), "--set", "objective.weightng=none", "--out", str(tmp_path / "bad")])
    err = " ".join(capsys.readouterr().err.split())
    assert "weightng" in err and "weighting" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
