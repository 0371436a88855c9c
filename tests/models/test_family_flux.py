"""Flux.1 family: conditioning equal to the pipeline's (CLIP pooled + T5), packed latents decoded from the
pipeline's latent output, deterministic generation at the VAE's native size."""

from __future__ import annotations

import pytest

from synthcxr.models.families import FAMILIES, detect

PROMPTS = ["a chest x-ray", "pneumonia"]


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")


def test_conditioning_equals_the_pipeline_encoding(tiny_family_model):
    import torch

    from synthcxr.models.load import load_pipeline

    fam, pipe = FAMILIES["flux"], load_pipeline(tiny_family_model("flux"))
    assert detect(tiny_family_model("flux")).name == "flux"
    encoders = {s.encoder: getattr(pipe, s.encoder) for s in fam.text_encoders}
    tokenizers = {s.tokenizer: getattr(pipe, s.tokenizer) for s in fam.text_encoders}
    ours = fam.encode_prompts(encoders, tokenizers, PROMPTS, "cpu")
    for i, prompt in enumerate(PROMPTS):
        theirs = fam.prompt_kwargs(pipe, prompt, "", "cpu", guidance=True)
        assert "negative_prompt_embeds" not in theirs  # guidance is an embedding, not a second pass
        for key, value in ours.items():
            torch.testing.assert_close(value[i:i + 1], theirs[key], rtol=1e-5, atol=1e-5)


def test_training_denoise_is_the_pipeline_transformer_call_on_packed_latents(tiny_family_model):
    import torch
    from diffusers import FluxPipeline

    from synthcxr.models.families.flux import TRAIN_GUIDANCE
    from synthcxr.models.load import load_pipeline

    fam, pipe = FAMILIES["flux"], load_pipeline(tiny_family_model("flux"))
    assert fam.resolution_multiple(pipe.vae, pipe.transformer) == 4  # VAE x2, packing x2
    cond = {k: v for k, v in fam.prompt_kwargs(pipe, PROMPTS[0], "", "cpu", False).items() if k != "max_sequence_length"}
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = fam.denoise(pipe.transformer, noisy, torch.tensor([700.0]), cond, resolution=32)
        packed = FluxPipeline._pack_latents(noisy, 1, 4, 16, 16)
        ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", noisy.dtype)
        theirs = pipe.transformer(hidden_states=packed, timestep=torch.tensor([0.7]),
                                  guidance=torch.tensor([TRAIN_GUIDANCE]), pooled_projections=cond["pooled_prompt_embeds"],
                                  encoder_hidden_states=cond["prompt_embeds"],
                                  txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3), img_ids=ids,
                                  return_dict=False)[0]
    torch.testing.assert_close(FluxPipeline._pack_latents(ours, 1, 4, 16, 16), theirs)


def test_generate_is_deterministic_and_decodes_packed_latents(tiny_family_model, tmp_path):
    from PIL import Image

    from synthcxr.generate.sample import CONFIG_FILE, GenerateConfig, generate_images

    model = tiny_family_model("flux")

    def run(out):
        return generate_images(GenerateConfig(model=str(model), prompt="a chest x-ray", n=2, steps=2, batch_size=2,
                                              out=out))

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    names = sorted(p.name for p in a.glob("0*.png"))
    assert len(names) == 2 and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert Image.open(a / names[0]).size == (32, 32)  # native size of the tiny model (its VAE's)
    saved = (a / CONFIG_FILE).read_text()
    assert "scheduler: flow_euler" in saved and "guidance: 3.5" in saved
