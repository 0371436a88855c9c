"""A tiny random-initialised Stable Diffusion pipeline, built from config, offline, in seconds.

It has the real architecture classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer), so every code path that works on it works on SD 1.x/2.x weights; only sizes differ.
The tokenizer is a byte-level BPE with no merges (every character is a token), written locally.

Optionally its VAE is fitted to a folder of chest X-rays (`vae_data`, tiny_vae.py) so its decoder
renders them: the demo's base model, whose denoiser is still random until fine-tuned.
"""

from __future__ import annotations

import json
from pathlib import Path

from synthcxr.logging_utils import get_logger
from synthcxr.models.tiny_vae import VaeFit, fit_saved_vae

log = get_logger(__name__)

TINY_TEXT_DIM = 32

DEMO_DENOISER = {
    # three levels (32 -> 16 -> 8 latent px at 64 px) with cross-attention only at the lowest: the
    # receptive field covers the whole chest and attention costs little on a CPU (attention over all
    # 32 x 32 latent pixels made a training step about 5x slower)
    "unet": {"block_out_channels": (32, 64, 64), "layers_per_block": 1,
             "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")},
    # DDPM's linear betas (made for 32 x 32 images) end at almost zero signal, unlike SD's schedule
    # (made for 64 x 64 latents); v-prediction's target at high noise is the image itself, so the
    # coarse anatomy is learnt first; trailing spacing starts sampling at the last timestep (pure noise)
    "scheduler": {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": False,
                  "set_alpha_to_one": False, "steps_offset": 0, "prediction_type": "v_prediction",
                  "timestep_spacing": "trailing"},
}
"""The denoiser `synthcxr demo` fine-tunes from random weights in a few CPU minutes (`denoiser="demo"`)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (same as transformers' CLIP tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_tokenizer(out_dir: Path, max_length: int = 77) -> Path:
    """Write vocab.json/merges.txt for a character-level CLIPTokenizer (vocab of 514 tokens)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True})
    )
    return out_dir


def build_tiny_pipeline(
    *,
    sample_size: int = 64,
    prediction_type: str = "epsilon",
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    denoiser: str = "test",
):
    """Return a tiny `StableDiffusionPipeline` (about 1M parameters) with random weights.

    `sample_size` is the pixel resolution it is meant for (the VAE downsamples by 2 here, not 8,
    to keep latents non-trivial at 64 px). `denoiser="demo"` builds the one the demo fine-tunes
    (DEMO_DENOISER below); "test" the smallest one every test uses.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if denoiser not in ("test", "demo"):
        raise ValueError(f"unknown tiny denoiser {denoiser!r}; use test or demo")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        **(DEMO_DENOISER["unet"] if denoiser == "demo" else {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        }),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tiny_tokenizer(Path(tokenizer_dir or tmp))
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    scheduler = DDIMScheduler(**DEMO_DENOISER["scheduler"]) if denoiser == "demo" else DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_model(out_dir: str | Path, *, sample_size: int = 64, prediction_type: str = "epsilon", seed: int = 0,
                    vae_data: str | Path | None = None, vae_fit: VaeFit | None = None, denoiser: str = "test") -> Path:
    """Build the tiny pipeline and save it as a diffusers folder that `load_pipeline` reads.

    With `vae_data` its VAE is then fitted to those images (models/tiny_vae.py), so that what a
    denoiser learns can show; without it every part keeps its random weights (fast, for tests).
    """
    from synthcxr.models.load import library_progress_bars_off

    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(sample_size=sample_size, prediction_type=prediction_type, seed=seed, denoiser=denoiser)
    with library_progress_bars_off():
        pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "synthcxr_tiny.json").write_text(
        json.dumps({"sample_size": sample_size, "prediction_type": pipe.scheduler.config.prediction_type,
                    "seed": seed, "denoiser": denoiser, "note": "random weights; for tests and demos only"})
    )
    if vae_data is not None:
        fit_saved_vae(out_dir, vae_data, vae_fit or VaeFit(seed=seed))
    log.info("tiny model written to %s", out_dir)
    return out_dir
