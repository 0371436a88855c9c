"""Engine options on the tiny model: v-prediction, min-SNR-gamma, noise offset, bf16, checkpointing, CLI."""

from __future__ import annotations

import math

from synthcxr.fileio import read_jsonl


def test_v_prediction_min_snr_noise_offset_bf16_gradient_checkpointing(make_config, tmp_path):
    from synthcxr.train.loop import fit, setup

    cfg = make_config(model={"prediction_type": "v_prediction"},
                      train={"max_steps": 2, "min_snr_gamma": 5.0, "noise_offset": 0.1, "mixed_precision": "bf16",
                             "gradient_checkpointing": True, "cache_latents": "ram"},
                      method={"name": "lora", "dora": True})
    session = setup(cfg, tmp_path / "run")
    assert session.models.noise_scheduler.config.prediction_type == "v_prediction"
    assert session.models.unet.is_gradient_checkpointing
    import torch

    assert session.models.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in session.trainable.values())  # fp32 master weights
    assert any("lora_magnitude_vector" in k for k in session.trainable)  # DoRA
    fit(session)
    losses = [r["loss"] for r in read_jsonl(session.run.metrics) if r.get("kind") == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_validation_loss_is_reproducible_and_samples_are_written(make_config, tmp_path):
    from synthcxr.train.loop import setup

    cfg = make_config(data={"split": {"val": 0.25, "test": 0.0}},
                      train={"validation_seeds": [3], "validation_prompts": ["a chest x-ray"]})
    session = setup(cfg, tmp_path / "run")
    first = session.validate(0)
    second = session.validate(0)
    assert first["val_loss"] is not None and first["val_loss"] == second["val_loss"]
    assert (tmp_path / "run" / "samples" / "step_00000" / "p00_seed3.png").exists()


def test_cli_train_with_set_overrides_and_clear_errors(tiny_model_dir, train_data, tmp_path, capsys):
    import pytest

    from synthcxr.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{path: {train_data}, resolution: 64, "
                      "split: {val: 0.0, test: 0.0}}\ntrain: {validation_seeds: []}\n")
    out = tmp_path / "run"
    main(["train", str(config), "--set", "train.max_steps=1", "--set", "optimizer.lr=1e-3", "--out", str(out)])
    assert (out / "DONE").exists() and (out / "final" / "pytorch_lora_weights.safetensors").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "--set", "optimizer.name=adamw9", "--out", str(tmp_path / "other")])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "optimizer.name" in err and "did you mean 'adamw'" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()  # failed before any work
    with pytest.raises(SystemExit):
        main(["train", str(config), "--out", str(out)])
    assert "--resume" in " ".join(capsys.readouterr().err.split())


def test_run_uses_the_exact_step_formula(make_config, tmp_path):
    from synthcxr.train.loop import setup

    cfg = make_config(train={"max_steps": None, "epochs": 2, "repeats": 3, "batch_size": 3,
                             "gradient_accumulation": 2})
    session = setup(cfg, tmp_path / "run")
    assert session.plan.n_images == 8
    assert session.total == 2 * math.ceil(8 * 3 / (3 * 2 * 1)) == 8
