#!/usr/bin/env python3
"""Images/s of `synthcxr generate` (generate_images) against a plain diffusers StableDiffusionPipeline
call with the same settings (model, scheduler, steps, guidance, batch, resolution), in one run.

Both sides get the same already-loaded weights, both write one PNG per image (the plain side with
`image.save`, ours with provenance chunks, sha256 and a manifest line), and the two alternate
across repeats so machine noise hits both. The ratio ours / plain is the result.

    python benchmarks/generate.py                  # tiny random model on the CPU (default)
    python benchmarks/generate.py --sd15           # SD1.5 architecture, random weights, CUDA: 20 DPM-Solver++
                                                   # steps, batch 8, fp16, 512 px (reference: 6.8 images/s on an H100)
    python benchmarks/generate.py --sd15 --device cpu --resolution 64 --steps 2 --n 2 --batch 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a chest x-ray of a 45 year old male, tuberculosis"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd15", action="store_true", help="SD1.5 architecture with random weights (meant for a GPU)")
    p.add_argument("--family", default=None, help="sdxl, sd3, ...: a tiny random model of that family, plain "
                   "pipeline call vs generate_images (benchmarks/families.py); prints the ratio")
    p.add_argument("--device", default=None, help="default: cuda with --sd15 when available, else cpu")
    p.add_argument("--n", type=int, default=None, help="images per timed repeat (default 8; 32 with --sd15)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 4; 8 with --sd15)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="dpmsolver++")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 512 SD1.5")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side (median reported)")
    p.add_argument("--no-compile", action="store_true", help="ours without torch.compile (GPU)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    return p.parse_args(argv)


def build_sd15_pipeline(device: str, dtype):
    """Stable Diffusion 1.5 architecture (UNet 860M, VAE, CLIP ViT-L text encoder) with random weights:
    speed does not depend on the weight values, and no download is needed."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from synthcxr.models.tiny import write_tiny_tokenizer

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    with tempfile.TemporaryDirectory() as tmp:
        # the real CLIP BPE vocabulary is a download; a character-level tokenizer gives the same 77-token
        # sequences, so the text encoder does the same work
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(Path(tmp))))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.family:
        sys.path.insert(0, str(Path(__file__).parent))
        from families import generate_benchmark

        return generate_benchmark(args.family, res=args.resolution or 64, n=args.n or 4, batch=args.batch or 2,
                                  steps=args.steps, repeats=args.repeats, out=args.out)
    work = Path(tempfile.mkdtemp(prefix="synthcxr-bench-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the benchmark's own scratch folder


def run(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from synthcxr.generate.sample import GenerateConfig, generate_images
    from synthcxr.generate.schedulers import make_scheduler
    from synthcxr.models.load import load_pipeline
    from synthcxr.models.tiny import make_tiny_model

    logging.getLogger("synthcxr").setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()
    device = args.device or ("cuda" if args.sd15 and torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    dtype = torch.float16 if on_gpu else torch.float32
    n = args.n or (32 if args.sd15 else 8)
    batch = args.batch or (8 if args.sd15 else 4)

    # 1. the same weights for both sides (two pipeline objects, so our speed options cannot leak into plain)
    if args.sd15:
        model_name = "sd15-architecture-random-weights"
        torch.manual_seed(0)
        plain = build_sd15_pipeline(device, dtype)
        # random weights differ between the two builds, which does not change speed; on a CPU (smoke test)
        # one copy is shared to save memory (no speed options are applied there)
        ours_pipe = build_sd15_pipeline(device, dtype) if on_gpu else plain
        resolution = args.resolution or 512
    else:
        model_name = str(make_tiny_model(work / "tiny"))
        plain = load_pipeline(model_name, device=device)
        ours_pipe = load_pipeline(model_name, device=device)
        resolution = args.resolution or 64
    plain.scheduler = make_scheduler(args.scheduler, plain.scheduler.config)

    # 2. plain diffusers: one pipeline call per batch, then save each image
    def run_plain(rep: int) -> float:
        out = work / f"plain{rep}"
        out.mkdir()
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            k = min(batch, n - start)
            images = plain([PROMPT] * k, num_inference_steps=args.steps, guidance_scale=args.guidance,
                           height=resolution, width=resolution,
                           generator=torch.Generator("cpu").manual_seed(start)).images
            for i, image in enumerate(images):
                image.save(out / f"{start + i:05d}.png")
        sync(device)
        return n / (time.perf_counter() - t0)

    # 3. ours: the library entry point, defaults for this device
    def run_ours(rep: int) -> float:
        cfg = GenerateConfig(model=model_name, prompt=PROMPT, n=n, seed=0, batch_size=batch, steps=args.steps,
                             guidance=args.guidance, scheduler=args.scheduler, resolution=resolution,
                             device=device, out=work / f"ours{rep}", compile=False if args.no_compile else None)
        sync(device)
        t0 = time.perf_counter()
        generate_images(cfg, pipe=ours_pipe)
        sync(device)
        return n / (time.perf_counter() - t0)

    # warm-up (first calls allocate, autotune, and compile the UNet when enabled)
    t0 = time.perf_counter()
    run_ours(-1)
    warm_ours_s = time.perf_counter() - t0
    run_plain(-1)
    plain_ips, ours_ips = [], []
    for rep in range(args.repeats):
        plain_ips.append(run_plain(rep))
        ours_ips.append(run_ours(rep))
    result = {
        "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu ({os.cpu_count()} cores, "
                                                              f"{torch.get_num_threads()} torch threads)",
        "model": "sd15 architecture (random weights)" if args.sd15 else "tiny random SD",
        "settings": {"n": n, "batch": batch, "steps": args.steps, "guidance": args.guidance,
                     "scheduler": args.scheduler, "resolution": resolution, "dtype": str(dtype)},
        "plain_images_per_s": statistics.median(plain_ips),
        "ours_images_per_s": statistics.median(ours_ips),
        "ours_first_run_s": warm_ours_s,
        "runs": {"plain": plain_ips, "ours": ours_ips},
        "torch": torch.__version__,
    }
    result["ratio"] = result["ours_images_per_s"] / result["plain_images_per_s"]
    print(f"device: {result['device']} | model: {result['model']} | {json.dumps(result['settings'])}")
    print(f"plain diffusers: {result['plain_images_per_s']:.2f} images/s  (runs: "
          + ", ".join(f"{x:.2f}" for x in plain_ips) + ")")
    print(f"synthcxr:        {result['ours_images_per_s']:.2f} images/s  (runs: "
          + ", ".join(f"{x:.2f}" for x in ours_ips) + f"; first run incl. warm-up {warm_ours_s:.1f}s)")
    print(f"ratio synthcxr / plain: {result['ratio']:.2f}")
    if args.out or os.environ.get("OUT"):
        path = Path(args.out or Path(os.environ["OUT"]) / "generate_bench.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
