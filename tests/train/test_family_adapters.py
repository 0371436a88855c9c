"""LoHa, LoKr and OFT on SDXL and SD3: each trains 3 steps (adapter weights move, the base stays
bit-identical) and exports a merged pipeline that the family's plain diffusers pipeline loads and that
draws the validation samples' pixels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from synthcxr.fileio import read_jsonl

ADAPTER_KEYS = {"loha": "hada_", "lokr": "lokr_", "oft": "oft_"}
CASES = [(f, m) for f in ("sdxl", "sd3") for m in ("loha", "lokr", "oft")]
QUICK = {("sdxl", "lokr"), ("sd3", "oft")}
PROMPT = "a chest x-ray"


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


def _sample(pipe, cfg):
    """What validation.sample_images draws, through a plain pipeline."""
    image = pipe(PROMPT, num_inference_steps=cfg.train.validation_steps, guidance_scale=cfg.train.validation_guidance,
                 generator=torch.Generator().manual_seed(0), height=cfg.data.resolution,
                 width=cfg.data.resolution).images[0]
    return np.asarray(image, dtype=np.int16)


def _layers(adapter_keys, module: str, method: str) -> set[str]:
    """The base weights (state-dict keys of `module`) that these adapter tensors adapt."""
    return {k.split(".", 1)[1].rsplit(f".{ADAPTER_KEYS[method]}", 1)[0] + ".weight"
            for k in adapter_keys if k.startswith(f"{module}.")}


def _without_gradient(models, trainable):
    """Adapter tensors on layers whose output the model never uses, as in diffusers' own pipelines: SD3's last
    joint block discards the caption tokens' attention output (context_pre_only: its add_q_proj is unused);
    SDXL takes CLIP-L's penultimate hidden states (its last layer is unused). Weight decay may still move them."""
    if models.family.name == "sd3":
        last = f"transformer.transformer_blocks.{models.unet.config.num_layers - 1}.attn.add_q_proj."
    elif models.family.name == "sdxl":
        last = f"text_encoder.encoder.layers.{models.text_encoders['text_encoder'].config.num_hidden_layers - 1}."
    else:
        return set()
    return {k for k in trainable if k.startswith(last)}


@pytest.mark.parametrize(("family", "method"), [
    pytest.param(f, m, marks=() if (f, m) in QUICK else pytest.mark.slow, id=f"{f}-{m}") for f, m in CASES])
def test_adapter_trains_and_its_merged_export_loads_in_plain_diffusers(family, method, family_config,
                                                                      tiny_family_model, tmp_path):
    from PIL import Image

    from synthcxr.models.families import get_family
    from synthcxr.train.loop import finish, fit, setup

    # block size 8 divides every tiny layer width; LoKr also trains the CLIP encoders (SDXL: both)
    train_te = method == "lokr"
    cfg = family_config(family, method={"name": method, "block_size": 8, "train_text_encoder": train_te},
                        optimizer={"lr": 2e-2},
                        train={"max_steps": 3, "validation_seeds": [0], "validation_prompts": [PROMPT],
                               "validation_steps": 2})
    session = setup(cfg, tmp_path / "run")
    before = _snapshot(session.models)
    fit(session)
    after = _snapshot(session.models)
    trainable = set(session.trainable)
    assert trainable and all(ADAPTER_KEYS[method] in k for k in trainable)
    encoders = {k.split(".")[0] for k in trainable} - {"transformer", "unet"}
    clip = {s.encoder for s in get_family(family).trainable_encoders()}
    assert encoders == (clip if train_te else set())
    unused = _without_gradient(session.models, trainable)
    moved = {k for k in trainable if not torch.equal(before[k], after[k])}
    assert trainable - unused <= moved, f"unchanged: {sorted(trainable - unused - moved)}"
    assert [k for k in before if k not in trainable and not torch.equal(before[k], after[k])] == []
    losses = [r["loss"] for r in read_jsonl(session.run.metrics) if r.get("kind") == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    run = finish(session)
    info = json.loads((run / "synthcxr_model.json").read_text())
    assert info["pipeline"] == "final" and info["lora"] is None and info["merged_adapter"] == method
    sample = np.asarray(Image.open(run / "samples" / "step_00003" / "p00_seed0.png"), dtype=np.int16)

    pipeline_cls = get_family(family).pipeline_cls()
    plain = pipeline_cls.from_pretrained(str(run / "final"))
    plain.set_progress_bar_config(disable=True)
    names = [n for m in (plain.components.values()) if isinstance(m, torch.nn.Module) for n, _ in m.named_parameters()]
    assert not any(key in n for n in names for key in ("hada_", "lokr_", "oft_", "lora_"))
    assert np.abs(_sample(plain, cfg) - sample).max() <= 2, "the merged export does not draw what validation drew"
    # the adapted layers' weights are merged in; every other weight is the base model's, bit for bit
    base = pipeline_cls.from_pretrained(str(tiny_family_model(family)))
    for name in (get_family(family).denoiser, *encoders):
        ours, theirs = getattr(plain, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys()
        changed = {k for k in ours if not torch.equal(ours[k], theirs[k])}
        assert _layers(trainable - unused, name, method) <= changed <= _layers(trainable, name, method), name


def test_merged_adapter_of_sd3_without_t5_exports_a_pipeline_without_it(family_config, tmp_path):
    """model.drop_t5 with an adapter: the merged export is rebuilt from the base without T5 (as full fine-tuning
    exports it; it held the unused T5 before), and plain diffusers without T5 draws the validation sample."""
    from PIL import Image

    from synthcxr.models.families import get_family
    from synthcxr.train.loop import train

    cfg = family_config("sd3", model={"drop_t5": True}, method={"name": "loha"}, optimizer={"lr": 2e-2},
                        train={"max_steps": 1, "validation_seeds": [0], "validation_prompts": [PROMPT],
                               "validation_steps": 2})
    run = train(cfg, tmp_path / "run")
    index = json.loads((run / "final" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not (run / "final" / "text_encoder_3").exists()
    plain = get_family("sd3").pipeline_cls().from_pretrained(str(run / "final"), text_encoder_3=None)
    plain.set_progress_bar_config(disable=True)
    sample = np.asarray(Image.open(run / "samples" / "step_00001" / "p00_seed0.png"), dtype=np.int16)
    assert np.abs(_sample(plain, cfg) - sample).max() <= 2
