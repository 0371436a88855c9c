"""Sana family: detection, Gemma-2 conditioning (with the complex human instruction) equal to the
pipeline's own, deterministic DC-AE latents, deterministic generation, DC-AE resolution multiple."""

from __future__ import annotations

import pytest

from synthcxr.models.families import FAMILIES, detect

PROMPTS = ["a chest x-ray", "pneumonia"]


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")


def test_conditioning_equals_the_pipeline_encoding_with_its_instruction(tiny_family_model):
    import torch

    from synthcxr.models.load import load_pipeline

    fam, pipe = FAMILIES["sana"], load_pipeline(tiny_family_model("sana"))
    assert detect(tiny_family_model("sana")).name == "sana"
    ours = fam.encode_prompts({"text_encoder": pipe.text_encoder}, {"tokenizer": pipe.tokenizer}, PROMPTS, "cpu")
    for i, prompt in enumerate(PROMPTS):
        theirs = fam.prompt_kwargs(pipe, prompt, "", "cpu", guidance=False)
        for key, value in ours.items():
            torch.testing.assert_close(value[i:i + 1], theirs[key], rtol=1e-5, atol=1e-5)
    # the instruction is really in front: without it the embeddings differ
    bare, _, _, _ = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=False, device="cpu",
                                       complex_human_instruction=None)
    assert not torch.allclose(bare, ours["prompt_embeds"][:1])


def test_dc_ae_latents_are_the_encoder_output(tiny_family_model):
    """DC-AE has no latent distribution: the cached parameters give back its latent (to ~1e-6)."""
    import torch

    from synthcxr.models.load import load_pipeline
    from synthcxr.train.cache import sample_latents

    fam, pipe = FAMILIES["sana"], load_pipeline(tiny_family_model("sana"))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        params = fam.encode_params(pipe.vae, pixels)
        z = pipe.vae.encode(pixels).latent
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sample_latents(params, eps, *fam.latent_scale(pipe.vae)),
                               z * pipe.vae.config.scaling_factor, rtol=0, atol=1e-6)
    assert fam.latent_shape(pipe.vae, 32) == (4, 16, 16)


def test_generate_is_deterministic_with_family_defaults(tiny_family_model, tmp_path):
    from synthcxr.generate.sample import CONFIG_FILE, GenerateConfig, generate_images

    model = tiny_family_model("sana")

    def run(out, **kw):
        return generate_images(GenerateConfig(model=str(model), prompt="a chest x-ray", n=2, steps=2, batch_size=2,
                                              out=out, **kw))

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    names = sorted(p.name for p in a.glob("0*.png"))
    assert len(names) == 2 and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    saved = (a / CONFIG_FILE).read_text()
    assert "scheduler: flow_euler" in saved and "guidance: 4.5" in saved


def test_make_tiny_cli_sana(tmp_path):
    from typer.testing import CliRunner

    from synthcxr.cli import app

    result = CliRunner().invoke(app, ["model", "make-tiny", str(tmp_path / "m"), "--family", "sana",
                                      "--resolution", "32"])
    assert result.exit_code == 0, result.output
    assert detect(tmp_path / "m").name == "sana"


def test_flow_euler_keeps_the_flow_shift_of_a_dpm_solver_flow_config():
    """Released Sana models ship a DPM-Solver scheduler in flow mode with `flow_shift` (3.0 at 1024 px);
    the flow_euler sampler built from it must sample with that shift, not FlowMatchEuler's default 1.0."""
    from diffusers import DPMSolverMultistepScheduler

    from synthcxr.generate.schedulers import make_scheduler

    sana = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    assert make_scheduler("flow_euler", sana.config).config.shift == 3.0
    sd3 = make_scheduler("flow_euler", make_scheduler("flow_euler", {"shift": 2.0}).config)
    assert sd3.config.shift == 2.0  # a FlowMatchEuler config keeps its own shift
