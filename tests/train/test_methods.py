"""Every method x every optimizer trains on the tiny model: finite loss, trainable weights move,
frozen ones stay put; final weights load in plain diffusers and through `synthcxr generate`'s loader."""

from __future__ import annotations

import math

import pytest

from synthcxr.fileio import read_jsonl
from synthcxr.train.config import METHOD_NAMES, OPTIMIZER_NAMES


def _snapshot(session):
    modules = {"unet": session.models.unet, "vae": session.models.vae, "text_encoder": session.models.text_encoder}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_x_optimizer_trains(method, optimizer, make_config, tmp_path):
    from synthcxr.train.loop import fit, setup

    opt = {"name": optimizer, "lr": 1e-3}
    if optimizer in ("dadaptation", "prodigy"):
        opt["lr"] = 1.0
    cfg = make_config(method={"name": method}, optimizer=opt, train={"max_steps": 2, "batch_size": 1, "checkpoint_every": 2})
    session = setup(cfg, tmp_path / "run")
    before = _snapshot(session)
    fit(session)
    after = _snapshot(session)
    trainable = set(session.trainable)
    assert trainable, "nothing trains"
    moved = {k for k in trainable if not bool((before.get(k, after[k] * 0 + math.nan) == after[k]).all())}
    frozen_moved = [k for k in after if k not in trainable and k in before and not bool((before[k] == after[k]).all())]
    assert len(moved) >= 0.9 * len(trainable), f"only {len(moved)}/{len(trainable)} trainable tensors changed"
    assert frozen_moved == []
    assert all(k.startswith("unet.") for k in trainable)  # text encoder off by default
    if method == "lora":
        assert all("lora_" in k for k in trainable)
    else:
        assert len(trainable) == sum(1 for k in after if k.startswith("unet."))
    losses = [r["loss"] for r in read_jsonl(session.run.metrics) if r.get("kind") == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def _image(pipe, seed=0):
    import numpy as np
    import torch

    out = pipe("a chest x-ray", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return np.asarray(out)


def test_lora_file_loads_in_plain_diffusers_and_in_generate(make_config, tiny_model_dir, tmp_path):
    import json

    import numpy as np
    from diffusers import StableDiffusionPipeline

    from synthcxr.models.load import load_pipeline
    from synthcxr.train.loop import train

    cfg = make_config(method={"name": "lora", "train_text_encoder": True}, optimizer={"lr": 5e-2},
                      train={"max_steps": 3, "validation_seeds": [0]})
    run = train(cfg, tmp_path / "run")
    info = json.loads((run / "synthcxr_model.json").read_text())
    assert info["lora"] == "final/pytorch_lora_weights.safetensors" and info["pipeline"] is None
    assert (run / "samples" / "step_00003").is_dir() and any((run / "samples" / "step_00003").glob("*.png"))
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "DONE"):
        assert (run / name).exists(), name
    assert any((run / "logs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] > 0 and summary["images_per_s"] > 0 and summary["peak_memory_gib"] > 0

    plain = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    base = _image(plain)
    plain.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    with_lora = _image(plain)
    assert np.abs(with_lora - base).max() > 1e-3, "the LoRA file did not change the output"

    via_run = load_pipeline(run)  # what `synthcxr generate --model RUN_DIR` uses
    assert np.allclose(_image(via_run), with_lora, atol=2e-3)

    from synthcxr.cli import main

    out = tmp_path / "generated"
    main(["generate", "--model", str(run), "--prompt", "a chest x-ray", "--n", "1", "--steps", "2",
          "--resolution", "64", "--out", str(out)])
    assert len(list(out.glob("*.png"))) == 1


def test_full_finetune_exports_a_pipeline_generate_loads(make_config, tmp_path):
    import json

    import torch

    from synthcxr.models.load import load_pipeline
    from synthcxr.train.loop import train

    cfg = make_config(method={"name": "dreambooth"}, train={"max_steps": 2})
    run = train(cfg, tmp_path / "run")
    assert json.loads((run / "synthcxr_model.json").read_text())["pipeline"] == "final"
    pipe = load_pipeline(run)
    from safetensors.torch import load_file

    from synthcxr.train.checkpoint import latest_checkpoint

    saved = load_file(str(latest_checkpoint(run / "checkpoints") / "trainable.safetensors"))
    unet = dict(pipe.unet.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(unet[name.removeprefix("unet.")].detach(), tensor)


def test_adafactor_relative_step_brings_its_own_schedule(make_config, tmp_path):
    from transformers.optimization import AdafactorSchedule

    from synthcxr.train.loop import fit, setup

    cfg = make_config(optimizer={"name": "adafactor", "relative_step": True, "lr": None},
                      train={"max_steps": 2, "batch_size": 1})
    session = setup(cfg, tmp_path / "run")
    assert isinstance(session.lr_scheduler, AdafactorSchedule)
    fit(session)
    rows = [r for r in read_jsonl(session.run.metrics) if r.get("kind") == "train"]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in rows)
