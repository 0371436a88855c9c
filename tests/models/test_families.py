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
        detect(_index(tmp_path, "FluxPipeline"))
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
    bad = CliRunner().invoke(app, ["model", "make-tiny", str(tmp_path / "n"), "--family", "flux"])
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
