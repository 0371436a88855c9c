"""Model families: detection and overrides, clear errors, tiny models of each family, and
`generate` on SDXL and SD3 (deterministic, manifest, PNG and DICOM, family sampling defaults)."""

from __future__ import annotations

import json

import pytest

from synthcxr.errors import ConfigError, ModelError
from synthcxr.models.families import FAMILIES, detect, family_for, get_family

NEW_FAMILIES = ["sdxl", "sd3"]


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")


def _index(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return tmp_path


def test_detection_from_model_index(tmp_path, tiny_model_dir):
    assert detect(tiny_model_dir).name == "sd"
    assert detect(_index(tmp_path, "StableDiffusionXLPipeline")).name == "sdxl"
    assert detect(_index(tmp_path, "StableDiffusion3Pipeline")).name == "sd3"
    assert family_for(tmp_path, override="sdxl").name == "sdxl"  # model.family wins


def test_unknown_or_planned_family_errors_list_the_supported_ones(tmp_path):
    with pytest.raises(ModelError) as err:
        get_family("sd35")
    assert "did you mean 'sd3'" in str(err.value) and all(name in str(err.value) for name in FAMILIES)
    with pytest.raises(ModelError, match="not supported yet") as err:
        detect(_index(tmp_path, "Lumina2Pipeline"))
    assert "sdxl" in str(err.value)
    with pytest.raises(ModelError, match="unknown pipeline class 'KandinskyPipeline'"):
        detect(_index(tmp_path, "KandinskyPipeline"))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_tiny_model_is_detected_and_loads(family, tiny_family_model):
    from synthcxr.models.load import load_pipeline

    folder = tiny_family_model(family)
    assert detect(folder).name == family
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == FAMILIES[family].pipeline_class


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_conditioning_equals_the_pipeline_encoding(family, tiny_family_model):
    """Training's prompt encoding (`encode_prompts`) is what the pipeline itself computes."""
    import torch

    from synthcxr.models.load import load_pipeline

    fam, pipe = FAMILIES[family], load_pipeline(tiny_family_model(family))
    encoders = {s.encoder: getattr(pipe, s.encoder) for s in fam.text_encoders}
    tokenizers = {s.tokenizer: getattr(pipe, s.tokenizer) for s in fam.text_encoders}
    ours = fam.encode_prompts(encoders, tokenizers, ["a chest x-ray", "pneumonia"], "cpu")
    for i, prompt in enumerate(["a chest x-ray", "pneumonia"]):
        theirs = fam.prompt_kwargs(pipe, prompt, "", "cpu", guidance=False)
        for key, value in ours.items():
            torch.testing.assert_close(value[i:i + 1], theirs[key], rtol=1e-5, atol=1e-5)  # batch of 2 vs 1


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_generate_is_deterministic_with_family_defaults(family, tiny_family_model, tmp_path):
    from synthcxr.fileio import read_jsonl
    from synthcxr.generate.sample import CONFIG_FILE, MANIFEST, GenerateConfig, generate_images

    model = tiny_family_model(family)

    def run(out, **kw):
        cfg = GenerateConfig(model=str(model), prompt="a chest x-ray", n=2, steps=2, batch_size=2, out=out, **kw)
        return generate_images(cfg)

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    names = sorted(p.name for p in a.glob("0*.png"))
    assert len(names) == 2
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    rows = read_jsonl(a / MANIFEST)
    assert len(rows) == 2
    saved = (a / CONFIG_FILE).read_text()
    defaults = FAMILIES[family].sample
    assert f"scheduler: {defaults.scheduler}" in saved and f"guidance: {defaults.guidance}" in saved
    dicom = run(tmp_path / "dcm", format="dicom")
    assert len(list(dicom.glob("0*.dcm"))) == 2


def test_sampler_of_another_objective_is_refused(tiny_family_model, tmp_path):
    from synthcxr.generate.sample import GenerateConfig, generate_images

    cfg = GenerateConfig(model=str(tiny_family_model("sd3")), prompt="x", n=1, steps=1, scheduler="dpmsolver++",
                         out=tmp_path / "o")
    with pytest.raises(ConfigError, match="flow_euler"):
        generate_images(cfg)


def test_make_tiny_cli_family(tmp_path):
    from typer.testing import CliRunner

    from synthcxr.cli import app

    result = CliRunner().invoke(app, ["model", "make-tiny", str(tmp_path / "m"), "--family", "sd3",
                                      "--resolution", "32"])
    assert result.exit_code == 0, result.output
    assert detect(tmp_path / "m").name == "sd3"
    bad = CliRunner().invoke(app, ["model", "make-tiny", str(tmp_path / "n"), "--family", "lumina2"])
    assert bad.exit_code != 0 and "sdxl" in str(bad.output) + str(bad.exception)


def test_every_sampler_belongs_to_a_family():
    from synthcxr.generate.schedulers import SCHEDULERS

    assert set(SCHEDULERS) == {name for fam in FAMILIES.values() for name in fam.schedulers}


def test_hub_id_family_comes_from_the_cached_model_index(tmp_path, monkeypatch):
    """A hub id in the local cache is detected offline (an SDXL id must not load as SD 1.x)."""
    snapshot = tmp_path / "models--org--my-sdxl" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (tmp_path / "models--org--my-sdxl" / "refs").mkdir()
    (tmp_path / "models--org--my-sdxl" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert family_for("org/my-sdxl").name == "sdxl"
    assert family_for("org/not-cached").name == "sd"  # unknown offline: today's default


def _sd35_large_header_only(path):
    """A .safetensors file whose tensor names say SD 3.5 Large (what a user downloads), with tiny tensors."""
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight": torch.zeros(1, 1)}, str(path))
    return path


def test_single_file_whose_config_must_be_given_fails_before_loading(tmp_path, monkeypatch):
    """Offline, a single SD3 file without model.single_file_config cannot be built (its architecture config
    lives in a hub repo that is not cached): say so by name before diffusers reads any weights."""
    from diffusers import StableDiffusion3Pipeline

    from synthcxr.errors import ModelError
    from synthcxr.models.load import load_pipeline

    path = _sd35_large_header_only(tmp_path / "sd3.5_large.safetensors")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the config check")

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_single_file", no_loading)
    with pytest.raises(ModelError) as err:
        load_pipeline(path)
    text = str(err.value)
    assert "Stable Diffusion 3" in text and str(path) in text and "single-file-config" in text
    assert "stabilityai/stable-diffusion-3.5-large" in text


def test_single_file_config_is_checked_with_the_training_config(tmp_path):
    from synthcxr.errors import ModelError
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.family_checks import check_family_config

    path = _sd35_large_header_only(tmp_path / "sd3.5_large.safetensors")
    cfg = TrainConfig.model_validate({"model": {"path": str(path)}})
    with pytest.raises(ModelError, match="single_file_config"):
        check_family_config(cfg)
