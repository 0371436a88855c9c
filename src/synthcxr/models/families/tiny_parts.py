"""Tiny random SDXL and SD3 pipelines from config: the real classes at test sizes, offline, in seconds.

Like models/tiny.py (SD 1.x/2.x), the VAE downsamples by 2 so latents stay non-trivial at 32-64 px.
Tokenizers are written locally: the character-level CLIP tokenizer of models/tiny.py, and a
character-level word-level tokenizer standing in for T5's SentencePiece one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

CLIP_DIM = 32
T5_DIM = 64


def _clip_config(projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=514, hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                          pad_token_id=513, **({"projection_dim": CLIP_DIM} if projection else {}))


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    from synthcxr.models.tiny import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(Path(tmp))))


def t5_tokenizer(max_length: int = 256) -> Any:
    """A character-level tokenizer with T5's special tokens (<pad> 0, </s> 1, <unk> 2), ending each text with </s>."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation + " "
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def _vae(resolution: int, **config: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=resolution, **config)


def tiny_sdxl(*, resolution: int = 64, seed: int = 0, tokenizer_dir: Path | None = None) -> Any:
    """A tiny `StableDiffusionXLPipeline`: text-time UNet, CLIP + CLIP-with-projection, Euler sampler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2 * CLIP_DIM, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + CLIP_DIM)
    vae = _vae(resolution, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(_clip_config(projection=False))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(projection=True))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)


def tiny_sd3(*, resolution: int = 64, seed: int = 0, tokenizer_dir: Path | None = None) -> Any:
    """A tiny `StableDiffusion3Pipeline`: 1-layer MMDiT (patch 2), CLIP x2 + T5, flow-matching Euler (shift 3)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_DIM, pos_embed_max_size=64)
    vae = _vae(resolution, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
    text_encoder = CLIPTextModelWithProjection(_clip_config(projection=True))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(projection=True))
    t5_tok = t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                             eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
                                    text_encoder_2=text_encoder_2, tokenizer_2=_clip_tokenizer(),
                                    text_encoder_3=text_encoder_3, tokenizer_3=t5_tok)


def tiny_pixart(*, resolution: int = 64, seed: int = 0) -> Any:
    """A tiny `PixArtSigmaPipeline`: 1-layer DiT (patch 2, learned sigma), tiny T5, DPM-Solver++."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=resolution // 2, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=T5_DIM,
        norm_type="ada_norm_single", use_additional_conditions=False)
    vae = _vae(resolution, scaling_factor=0.13025)
    tok = t5_tokenizer(max_length=300)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1,
                                           num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon")
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)


def tiny_sana(*, resolution: int = 64, seed: int = 0) -> Any:
    """A tiny `SanaPipeline`: 1-layer linear-attention DiT, 2-layer Gemma-2, 2-block DC-AE (x2), flow Euler."""
    import torch
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    gemma_dim = 32
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=gemma_dim,
        sample_size=resolution // 2, patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    tok = t5_tokenizer(max_length=4096)  # character-level stand-in for Gemma's SentencePiece tokenizer
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=gemma_dim, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16, max_position_embeddings=4096, sliding_window=4096,
                                            pad_token_id=0, eos_token_id=1, bos_token_id=2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return SanaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


def tiny_flux(*, resolution: int = 64, seed: int = 0) -> Any:
    """A tiny `FluxPipeline`: 1 double + 1 single block with guidance embedding, CLIP + T5, dynamic-shift flow Euler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                         pooled_projection_dim=CLIP_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = _vae(resolution, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
               use_post_quant_conv=False)
    t5_tok = t5_tokenizer(max_length=512)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                             eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_clip_config(projection=False)),
                        tokenizer=_clip_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=t5_tok,
                        transformer=transformer)
