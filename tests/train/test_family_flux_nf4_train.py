"""QLoRA on the tiny Flux.1: `model.quantize: nf4` turns the frozen transformer's Linear layers into
bitsandbytes 4-bit NF4 before the LoRA adapters are added (bitsandbytes runs them on the CPU, slowly).
Three steps move only the adapters (the packed 4-bit weights stay bit-identical); the LoRA file loads onto
the unquantized base in plain diffusers with the pixels `synthcxr generate` makes; a quantized base with
whole-weight training, text-encoder training or a non-LoRA adapter, and a machine where bitsandbytes
cannot run 4-bit layers, fail before any work."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from synthcxr.errors import ConfigError, ModelError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def family_config(tiny_family_model, train_data):
    from train_helpers import tiny_config_dict

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    def make(family="flux", **sections):
        cfg = tiny_config_dict(tiny_family_model(family), train_data, **sections)
        cfg["model"]["quantize"] = cfg["model"].get("quantize", "nf4")
        return build_config(TrainConfig, cfg)

    return make


def _bnb_runs_here() -> str | None:
    try:
        from synthcxr.models.quantize import check_quantization_runs

        check_quantization_runs("nf4", "cpu")
    except ModelError as exc:
        return str(exc)
    return None


needs_cpu_nf4 = pytest.mark.skipif(_bnb_runs_here() is not None, reason=f"{_bnb_runs_here()}")


@needs_cpu_nf4
@pytest.mark.parametrize("family", ["flux", "sd3", "sdxl"])  # any family's denoiser; Flux is the one that needs it
def test_nf4_lora_trains_three_steps_and_the_quantized_base_stays_bit_identical(family, family_config, tmp_path):
    import bitsandbytes as bnb
    import torch

    from synthcxr.train.loop import fit, setup

    session = setup(family_config(family, train={"max_steps": 3, "checkpoint_every": 3}), tmp_path / "run")
    m = session.models
    quantized = [mod for name, mod in m.unet.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
    plain = [name for name, mod in m.unet.named_modules() if type(mod) is torch.nn.Linear and "lora_" not in name]
    assert quantized and plain == []  # every frozen Linear is 4-bit (the adapters' own Linears are not)
    assert all(q.weight.dtype == torch.uint8 and q.weight.quant_state.quant_type == "nf4" for q in quantized)
    modules = {m.family.denoiser: m.unet, "vae": m.vae, **m.text_encoders}
    before = {f"{k}.{n}": p.detach().clone() for k, mod in modules.items() for n, p in mod.named_parameters()}
    fit(session)
    after = {f"{k}.{n}": p.detach().clone() for k, mod in modules.items() for n, p in mod.named_parameters()}
    trainable = set(session.trainable)
    assert trainable and all("lora_" in k and session.trainable[k].dtype == torch.float32 for k in trainable)
    moved = {k for k in trainable if not bool((before[k] == after[k]).all())}
    frozen_moved = [k for k in after if k not in trainable and not torch.equal(before[k], after[k])]
    assert len(moved) >= 0.9 * len(trainable) and frozen_moved == []
    rows = [r for r in (json.loads(x) for x in session.run.metrics.read_text().splitlines()) if r.get("kind") == "train"]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


@needs_cpu_nf4
def test_nf4_lora_loads_on_the_unquantized_base_in_plain_diffusers(family_config, tiny_family_model, tmp_path,
                                                                  monkeypatch):
    from PIL import Image

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.models.families import get_family
    from synthcxr.train.loop import train

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")
    run = train(family_config(optimizer={"lr": 5e-2}, train={"max_steps": 3, "checkpoint_every": 3}),
                tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    model = str(tiny_family_model("flux"))
    plain = get_family("flux").pipeline_cls().from_pretrained(model)
    assert summary["model_params"] == sum(p.numel() for p in plain.transformer.parameters())  # unpacked count
    plain.set_progress_bar_config(disable=True)

    def px(out, pipe=None, source=run):
        folder = generate_images(GenerateConfig(model=str(source), prompt="a chest x-ray", n=1, steps=2,
                                                out=tmp_path / out), pipe=pipe)
        return np.asarray(Image.open(folder / "00000.png")).astype(int)

    base = px("base", plain, model)
    plain.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    theirs, ours = px("theirs", plain), px("ours")
    assert np.abs(theirs - base).max() > 0, "the LoRA file did not change the output"
    assert np.abs(ours - theirs).max() <= 1


@pytest.mark.parametrize(("family", "method", "match"), [
    ("sana", {"name": "full"}, "trains whole weights"),
    ("flux", {"name": "loha"}, "LoRA adapters only"),
    ("flux", {"name": "lora", "train_text_encoder": True}, "text encoder"),
])
def test_quantized_base_with_other_training_is_refused_before_any_work(family, method, match, family_config,
                                                                       tmp_path):
    from synthcxr.train.loop import train

    with pytest.raises(ConfigError, match=match) as err:
        train(family_config(family, method=method), tmp_path / "run")
    assert "model.quantize" in str(err.value) and not (tmp_path / "run").exists()


def test_a_machine_where_bitsandbytes_cannot_run_4bit_fails_before_any_work(family_config, tmp_path, monkeypatch):
    from synthcxr.train.loop import train

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ModelError, match="bitsandbytes") as err:
        train(family_config(), tmp_path / "run")
    assert "model.quantize" in str(err.value) and not (tmp_path / "run").exists()

    import synthcxr.models.quantize as q

    def no_kernel(device):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.delitem(sys.modules, "bitsandbytes")
    monkeypatch.setattr(q, "_probe_4bit", no_kernel)
    with pytest.raises(ModelError, match="no 4-bit kernel for this device"):
        train(family_config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_quantize_is_a_typed_option():
    from synthcxr.train.config import ModelSection

    assert ModelSection().quantize == "none"
    with pytest.raises(ValueError, match="nf4"):
        ModelSection(quantize="int3")


@needs_cpu_nf4
def test_nf4_resume_onto_a_freshly_quantized_base_is_bit_identical(family_config, read_trainable, tmp_path):
    import torch

    from synthcxr.train.loop import train

    run = train(family_config(train={"max_steps": 2, "checkpoint_every": 1}), tmp_path / "run")
    (run / "DONE").unlink()
    train(family_config(train={"max_steps": 3, "checkpoint_every": 1}), run, resume=True)
    reference = train(family_config(train={"max_steps": 3, "checkpoint_every": 1}), tmp_path / "ref")
    resumed, straight = read_trainable(run), read_trainable(reference)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)


@needs_cpu_nf4
def test_the_gpu_measurement_script_runs_its_step_on_a_small_flux_here():
    """benchmarks/flux_qlora.py --full-size measures on a GPU; its step runs here on a small config."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "flux_qlora.py"
    spec = importlib.util.spec_from_file_location("flux_qlora", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": (4, 6, 6)}
    result = bench.full_size_case("nf4", 1, 32, device="cpu", **small)
    assert result["finite_losses"] and result["trainable_params"] > 0 and result["img_per_s"] > 0


@needs_cpu_nf4
def test_nf4_dreambooth_lora_with_prior_preservation_and_a_merged_export(family_config, tiny_family_model, tmp_path):
    """DreamBooth-LoRA (instance prompt, class images from the quantized base) trains; export=merged folds the
    adapters into a fresh unquantized copy of the base, which plain diffusers loads."""
    import bitsandbytes as bnb

    from synthcxr.models.families import get_family
    from synthcxr.train.loop import train

    run = train(family_config(method={"name": "lora", "prompts": "instance", "prior_preservation": True,
                                      "num_class_images": 2, "class_image_steps": 1, "export": "merged"},
                              train={"max_steps": 2, "checkpoint_every": 2}), tmp_path / "run")
    info = json.loads((run / "synthcxr_model.json").read_text())
    assert info["pipeline"] == "final" and info["merged_adapter"] == "lora"
    merged = get_family("flux").pipeline_cls().from_pretrained(str(run / "final"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.transformer.modules())
    plain = get_family("flux").pipeline_cls().from_pretrained(str(tiny_family_model("flux")))
    base, new = dict(plain.transformer.named_parameters()), dict(merged.transformer.named_parameters())
    assert base.keys() == new.keys() and any(not bool((base[k] == new[k]).all()) for k in base)


@needs_cpu_nf4
def test_a_base_to_quantize_is_read_in_the_mixed_precision_dtype(family_config, tmp_path, monkeypatch):
    """Half the CPU memory of fp32 while the base waits to be quantized (Flux.1-dev: 24 GB instead of 48)."""
    import torch

    import synthcxr.models.load as load
    from synthcxr.train.loop import setup

    seen = []
    real = load.load_pipeline

    def spy(*args, **kwargs):
        seen.append(kwargs.get("torch_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "load_pipeline", spy)
    session = setup(family_config(train={"max_steps": 1, "mixed_precision": "bf16"}), tmp_path / "run")
    assert seen == [torch.bfloat16] and session.models.unet.dtype == torch.bfloat16
    setup(family_config(model={"quantize": "none"}, train={"max_steps": 1, "mixed_precision": "bf16"}),
          tmp_path / "run2")
    assert seen[1] is None  # an unquantized base still loads as before
