"""Model loading: diffusers folder, single original-format checkpoint, hub id offline, SD 2.x
v-prediction, and a training run directory (base model + LoRA)."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthcxr.errors import ModelError
from synthcxr.generate.sample import GenerateConfig, generate_images
from synthcxr.generate.schedulers import SCHEDULERS, make_scheduler
from synthcxr.models import load as load_mod
from synthcxr.models.load import RUN_MODEL_FILE, load_pipeline, resolve_source

# --------------------------------------------------------------------------- original (LDM) format
# diffusers ships the original -> diffusers conversion (what `from_single_file` runs); tests need the
# way back to write a single-file checkpoint like the ones users download. These renames invert
# diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` / `convert_ldm_clip_checkpoint`.
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(rest: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    static = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    lpb = config["layers_per_block"]
    out = {}
    for key, value in sd.items():
        if key in static:
            out[static[key]] = value
            continue
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = 1 + b * (lpb + 1) + j
            new = f"input_blocks.{i}.0.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename(m[2], UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = b * (lpb + 1) + j
            new = f"output_blocks.{i}.0.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            has_attn = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
            new = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv.{m[2]}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out[new] = value
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def vae_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    static = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in sd.items():
        if key in static:
            out[static[key]] = value
            continue
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            new = f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTN)}"
            if value.ndim == 2:  # the original VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise AssertionError(f"unmapped VAE key {key}")
        out[new] = value
    return {"first_stage_model." + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    sd = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    sd.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        sd["cond_stage_model.transformer." + key] = value
    return {k: v.contiguous() for k, v in sd.items()}


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key} differs"


def _pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir)


# --------------------------------------------------------------------------- tests
def test_local_folder_loads_as_sd_pipeline(tiny_model_dir, tiny_pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(tiny_pipe, StableDiffusionPipeline)
    assert tiny_pipe.safety_checker is None
    assert tiny_pipe.unet.dtype == torch.float32
    assert resolve_source(tiny_model_dir).kind == "folder"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_offline_with_config(tiny_model_dir, tiny_pipe, tmp_path, suffix):
    state = pipeline_to_ldm(tiny_pipe)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    pipe = load_pipeline(path, single_file_config=tiny_model_dir)
    _same_weights(pipe, tiny_pipe)
    assert pipe.scheduler.config.prediction_type == tiny_pipe.scheduler.config.prediction_type


def test_single_file_without_config_offline_says_what_to_pass(tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(pipeline_to_ldm(tiny_pipe), str(path))
    with pytest.raises(ModelError) as err:
        load_pipeline(path)
    assert "single-file-config" in str(err.value) and str(path) in str(err.value)


def _import_pipeline_classes() -> None:
    """Import diffusers' pipeline classes before a timed block, so it times the failure, not the import
    (tens of seconds on a loaded machine)."""
    from synthcxr.models.families import FAMILIES

    for family in FAMILIES.values():
        family.pipeline_cls()


def test_hub_id_offline_fails_at_once_with_local_path_advice(monkeypatch):
    _import_pipeline_classes()
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_pipeline("runwayml/stable-diffusion-v1-5")
    assert time.monotonic() - start < 5
    text = str(err.value)
    assert "cannot be reached" in text and "--model DIR" in text


def test_hub_id_without_offline_env_but_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(load_mod, "hub_reachable", lambda timeout=3.0: False)
    _import_pipeline_classes()
    start = time.monotonic()
    with pytest.raises(ModelError, match="local"):
        load_pipeline("stabilityai/stable-diffusion-2-1")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.mkdir(), "not a diffusers model"),
    (lambda p: (p.mkdir(), (p / "checkpoints").mkdir()), "training run without final weights"),
    (lambda p: p.with_suffix(".txt").write_text("x"), "unsupported model file type"),
])
def test_bad_model_paths_have_clear_messages(tmp_path, make, message):
    target = tmp_path / "model"
    make(target)
    arg = target.with_suffix(".txt") if message.startswith("unsupported") else target
    with pytest.raises(ModelError, match=message):
        load_pipeline(arg)


def test_missing_model_path_is_reported(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        load_pipeline(tmp_path / "nope")


def test_v_prediction_model_generates_and_every_sampler_keeps_it(tmp_path):
    from synthcxr.models.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "v", prediction_type="v_prediction")
    pipe = load_pipeline(model)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for name in SCHEDULERS:
        assert make_scheduler(name, pipe.scheduler.config).config.prediction_type == "v_prediction", name
    out = generate_images(GenerateConfig(model=str(model), prompt="a chest x-ray", n=1, steps=2, scheduler="euler",
                                         out=tmp_path / "out"), pipe=pipe)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    (img,) = _pixels(out)
    assert img.shape == (64, 64) and img.std() > 0
    # the same weights read as epsilon give another image: the prediction type is really used
    eps = generate_images(GenerateConfig(model=str(model), prompt="a chest x-ray", n=1, steps=2, scheduler="euler",
                                         prediction_type="epsilon", out=tmp_path / "eps"))
    assert not np.array_equal(img, _pixels(eps)[0])


def test_prediction_type_override_and_validation(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ModelError, match="prediction_type"):
        load_pipeline(tiny_model_dir, prediction_type="sample_x")


def _write_lora_run(run: Path, base: Path) -> Path:
    """A run directory as training leaves it: synthcxr_model.json + a LoRA file diffusers can load."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline(base)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(run / "final", unet_lora_layers=layers,
                                              weight_name="pytorch_lora_weights.safetensors")
    (run / RUN_MODEL_FILE).write_text(json.dumps(
        {"base_model": str(base), "pipeline": None, "lora": "final/pytorch_lora_weights.safetensors"}))
    return run


def test_run_directory_with_lora_changes_the_images(tiny_model_dir, tmp_path):
    run = _write_lora_run(tmp_path / "run", tiny_model_dir)
    source = resolve_source(run)
    assert source.kind == "run" and source.lora.name == "pytorch_lora_weights.safetensors"
    common = dict(prompt="a chest x-ray", n=2, steps=2, batch_size=2)
    base_out = generate_images(GenerateConfig(model=str(tiny_model_dir), out=tmp_path / "base", **common))
    lora_out = generate_images(GenerateConfig(model=str(run), out=tmp_path / "lora", **common))
    for a, b in zip(_pixels(base_out), _pixels(lora_out), strict=True):
        assert np.abs(a.astype(int) - b).mean() > 1
    # fusing the LoRA into the weights gives the same result as running it as an adapter
    fused, adapter = load_pipeline(run), load_pipeline(run, fuse_lora=False)
    assert not any("lora" in k for k in fused.unet.state_dict())
    assert any("lora" in k for k in adapter.unet.state_dict())
    x, t = torch.randn(2, 4, 32, 32), torch.tensor(10)
    ctx = torch.randn(2, 77, fused.text_encoder.config.hidden_size)
    with torch.inference_mode():
        assert torch.allclose(fused.unet(x, t, ctx).sample, adapter.unet(x, t, ctx).sample, atol=1e-4)


def test_run_directory_problems_are_clear(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MODEL_FILE).write_text(json.dumps({"base_model": str(tiny_model_dir), "pipeline": None,
                                                  "lora": "final/missing.safetensors"}))
    with pytest.raises(ModelError, match="LoRA weights listed by the run are missing"):
        load_pipeline(run)
    (run / "final").mkdir()
    (run / "final" / "missing.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="could not apply the run's LoRA weights"):
        load_pipeline(run)
    (run / RUN_MODEL_FILE).write_text(json.dumps({"base_model": None, "pipeline": None, "lora": None}))
    with pytest.raises(ModelError, match="neither a pipeline nor a base model"):
        load_pipeline(run)
    (run / RUN_MODEL_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_pipeline(run)


def test_run_directory_with_full_pipeline(tiny_model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "final" / "pipeline")
    (run / RUN_MODEL_FILE).write_text(json.dumps({"base_model": "somewhere/else", "pipeline": "final/pipeline",
                                                  "lora": None}))
    pipe = load_pipeline(run)
    assert pipe.unet.config.sample_size == 32


def test_saving_a_model_shows_no_library_progress_bars(tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    from synthcxr.models.tiny import make_tiny_model

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # as in a fresh process (loading a model turns them off)
    try:
        make_tiny_model(tmp_path / "m", sample_size=32)
        assert "Writing model shards" not in capsys.readouterr().err
        assert transformers_logging.is_progress_bar_enabled()  # switched back on after the save
    finally:
        if not was_on:
            transformers_logging.disable_progress_bar()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_unet_only_lora_loads_without_the_text_encoder_warning(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    run = _write_lora_run(tmp_path / "run", tiny_model_dir)
    records = _Records()
    lora_base = logging.getLogger("diffusers.loaders.lora_base")
    lora_base.addHandler(records)
    try:
        load_pipeline(run)
        assert not [m for m in records.messages if m.startswith("No LoRA keys")]
        # only that message, and only for a UNet-only file: other warnings, and files with text
        # encoder keys (where a missing match would be a real problem), still report
        text_file = tmp_path / "both.safetensors"
        save_file({"unet.a.lora_A.weight": torch.zeros(1), "text_encoder.b.lora_A.weight": torch.zeros(1)},
                  str(text_file))
        unet_file = run / "final" / "pytorch_lora_weights.safetensors"
        warning = "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'."
        for lora_file, shown in ((unet_file, False), (text_file, True)):
            records.messages.clear()
            with load_mod._unet_only_lora_quiet(lora_file):
                lora_base.warning(warning)
                lora_base.warning("something else about this LoRA")
            assert (warning in records.messages) is shown
            assert "something else about this LoRA" in records.messages
        lora_base.warning(warning)  # the filter is gone after the load
        assert records.messages[-1] == warning
    finally:
        lora_base.removeHandler(records)
