"""PixArt-Σ family: detection, conditioning equal to the pipeline's own T5 encoding (with its mask),
learned-sigma output handled as the pipeline does, deterministic generation, make-tiny."""

from __future__ import annotations

import json

import pytest

from synthcxr.models.families import FAMILIES, detect

PROMPTS = ["a chest x-ray", "pneumonia"]


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")


def test_pixart_pipelines_are_detected(tmp_path):
    for name in ("PixArtSigmaPipeline", "PixArtAlphaPipeline"):
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": name}))
        assert detect(tmp_path).name == "pixart"


def test_conditioning_equals_the_pipeline_encoding(tiny_family_model):
    import torch

    from synthcxr.models.load import load_pipeline

    fam, pipe = FAMILIES["pixart"], load_pipeline(tiny_family_model("pixart"))
    ours = fam.encode_prompts({"text_encoder": pipe.text_encoder}, {"tokenizer": pipe.tokenizer}, PROMPTS, "cpu")
    assert set(ours) == {"prompt_embeds", "prompt_attention_mask"}
    for i, prompt in enumerate(PROMPTS):
        theirs = fam.prompt_kwargs(pipe, prompt, "", "cpu", guidance=False)
        for key, value in ours.items():
            torch.testing.assert_close(value[i:i + 1], theirs[key], rtol=1e-5, atol=1e-5)
    assert int(ours["prompt_attention_mask"][1].sum()) < int(ours["prompt_attention_mask"][0].sum())  # padding masked


def test_learned_sigma_half_is_dropped_as_the_pipeline_does(tiny_family_model):
    """The tiny transformer predicts noise and variance (8 channels); training sees the noise half."""
    import torch

    from synthcxr.models.load import load_pipeline

    fam, pipe = FAMILIES["pixart"], load_pipeline(tiny_family_model("pixart"))
    cond = fam.encode_prompts({"text_encoder": pipe.text_encoder}, {"tokenizer": pipe.tokenizer}, PROMPTS, "cpu")
    noisy = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ours = fam.denoise(pipe.transformer, noisy, t, cond, resolution=32)
        raw = pipe.transformer(noisy, encoder_hidden_states=cond["prompt_embeds"],
                               encoder_attention_mask=cond["prompt_attention_mask"], timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert raw.shape[1] == 8 and ours.shape == noisy.shape
    torch.testing.assert_close(ours, raw[:, :4])


def test_generate_is_deterministic_with_family_defaults(tiny_family_model, tmp_path):
    from synthcxr.generate.sample import CONFIG_FILE, GenerateConfig, generate_images

    model = tiny_family_model("pixart")

    def run(out, **kw):
        return generate_images(GenerateConfig(model=str(model), prompt="a chest x-ray", n=2, steps=2, batch_size=2,
                                              out=out, **kw))

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    names = sorted(p.name for p in a.glob("0*.png"))
    assert len(names) == 2 and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    saved = (a / CONFIG_FILE).read_text()
    assert "scheduler: dpmsolver++" in saved and "guidance: 4.5" in saved
    other = run(tmp_path / "c", seed=1)
    assert (other / names[0]).read_bytes() != (a / names[0]).read_bytes()


def test_make_tiny_cli_pixart(tmp_path):
    from typer.testing import CliRunner

    from synthcxr.cli import app

    result = CliRunner().invoke(app, ["model", "make-tiny", str(tmp_path / "m"), "--family", "pixart",
                                      "--resolution", "32"])
    assert result.exit_code == 0, result.output
    assert detect(tmp_path / "m").name == "pixart"
