#!/usr/bin/env python
"""Flux.1 LoRA on a 4-bit NF4 base (`model.quantize: nf4`): a correctness check and a GPU measurement.

    python benchmarks/flux_qlora.py               # tiny Flux on this machine's device (CPU or GPU)
    python benchmarks/flux_qlora.py --full-size   # Flux.1-dev architecture (random init), 512 px, batch 1 (GPU)

Tiny check (any device): `synthcxr train` with model.quantize=nf4 runs 3 LoRA steps on the tiny Flux; the
packed 4-bit base weights stay bit-identical while the adapters move; the LoRA file loads onto the
unquantized base with `FluxPipeline.load_lora_weights`. On a GPU it also loads the same transformer the
way diffusers documents QLoRA (`from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4))`) and
compares its packed weights with ours (diffusers' loader refuses to quantize without a GPU).

Full size (GPU): the 11.9 B-parameter Flux.1-dev transformer built from its config with random weights
(speed and memory do not depend on the values), LoRA r32 on the family's default targets, bf16 autocast,
gradient checkpointing, 8-bit AdamW, cached text embeddings (T5 512 tokens), 512 px, batch 1. Two
cases, each in its own subprocess: `nf4` (synthcxr's quantized base) and `bf16` (the base held in bf16,
the reference). Prints img/s and peak GPU memory; --out FILE (default $OUT/flux_qlora.json) saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-size", action="store_true", help="Flux.1-dev architecture at 512 px (needs a GPU)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per full-size case (after 2 warm-up steps)")
    p.add_argument("--cases", default="nf4,bf16", help="full-size cases: nf4, bf16")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.out is None:
        a.out = str(Path(os.environ.get("OUT") or tempfile.gettempdir()) / "flux_qlora.json")
    return a


# ---------------------------------------------------------------------------------------- tiny check
def tiny_check(work: Path) -> dict:
    """Train 3 NF4 LoRA steps on the tiny Flux through synthcxr and check what must hold."""
    import bitsandbytes as bnb
    import torch

    from synthcxr.config import build_config
    from synthcxr.data.fixtures import make_fixture_dataset
    from synthcxr.models.families import get_family
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.loop import finish, fit, setup

    model = get_family("flux").write_tiny(work / "tiny_flux", resolution=32, seed=0)
    data = make_fixture_dataset(work / "data", "shenzhen", n=8, size=64, seed=0)
    cuda = torch.cuda.is_available()
    cfg = build_config(TrainConfig, {
        "model": {"path": str(model), "quantize": "nf4"},
        "data": {"path": str(data), "resolution": 32, "split": {"val": 0.0, "test": 0.0}},
        "method": {"name": "lora", "rank": 4}, "optimizer": {"name": "adamw", "lr": 5e-2},
        "train": {"max_steps": 3, "batch_size": 2, "checkpoint_every": 3, "validation_seeds": [],
                  "mixed_precision": "bf16" if cuda else "no", "seed": 0}})
    session = setup(cfg, work / "run")
    den = session.models.unet
    packed = {n: m.weight.detach().clone() for n, m in den.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    lora = {k: v.detach().clone() for k, v in session.trainable.items()}
    fit(session)
    run = finish(session)
    after = {n: m.weight for n, m in den.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    result = {"device": str(session.accelerator.device), "quantized_layers": len(packed),
              "base_bit_identical": all(torch.equal(packed[n], after[n]) for n in packed),
              "adapters_moved": sum(not torch.equal(lora[k], v) for k, v in session.trainable.items()) / len(lora)}
    pipe = get_family("flux").pipeline_cls().from_pretrained(str(model))
    pipe.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    result["lora_loads_in_diffusers"] = sum("lora_" in n for n, _ in pipe.transformer.named_parameters()) > 0
    if cuda:
        result["same_packing_as_diffusers_loader"] = _compare_with_diffusers_loader(model, packed)
    return result


def _compare_with_diffusers_loader(model: Path, ours: dict) -> bool:
    """diffusers' documented QLoRA load of the same transformer gives the same packed NF4 weights."""
    import bitsandbytes as bnb
    import torch
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = FluxTransformer2DModel.from_pretrained(str(model), subfolder="transformer", quantization_config=config,
                                                    torch_dtype=torch.float32)
    packed = {n: m.weight for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return packed.keys() == ours.keys() and all(torch.equal(ours[n].cpu(), packed[n].cpu()) for n in ours)


# ---------------------------------------------------------------------------------------- full size
def full_size_case(case: str, steps: int, res: int, device: str = "cuda", **config) -> dict:
    """Peak memory and speed of LoRA r32 training steps on the Flux.1-dev architecture (`config`: other sizes,
    for a CPU smoke run of this function)."""
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from synthcxr.models.families import get_family
    from synthcxr.models.quantize import quantize_linear_layers
    from synthcxr.train.config import MethodSection
    from synthcxr.train.methods import _unet_adapter

    family, dev = get_family("flux"), torch.device(device)
    cuda = dev.type == "cuda"
    with init_empty_weights():
        den = FluxTransformer2DModel(**{"guidance_embeds": True, **config})
    den.to(torch.bfloat16)  # still on the meta device: free
    den.to_empty(device="cpu")  # random bf16 weights in CPU memory; the GPU gets them quantized (or bf16)
    torch.manual_seed(0)  # the global generator: filling 11.9 B values uses every CPU core
    with torch.no_grad():
        for p in den.parameters():
            p.normal_(0.0, 0.02)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    if case == "nf4":
        quantize_linear_layers(den, "nf4", dev, torch.bfloat16)
    den.to(dev)
    load_s = time.perf_counter() - began
    base_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    _unet_adapter(den, MethodSection(name="lora", rank=32, target_modules=list(family.lora_targets)))
    for p in den.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    den.enable_gradient_checkpointing()
    params = [p for p in den.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    side = res // 8
    cond = {"prompt_embeds": torch.randn(1, 512, den.config.joint_attention_dim, device=dev, dtype=torch.bfloat16),
            "pooled_prompt_embeds": torch.randn(1, den.config.pooled_projection_dim, device=dev, dtype=torch.bfloat16)}
    x0 = torch.randn(1, den.config.in_channels // 4, side, side, device=dev)

    def step() -> float:
        sigma = torch.rand(1, device=dev)
        noise = torch.randn_like(x0)
        noisy = (1 - sigma) * x0 + sigma * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            pred = family.denoise(den, noisy, sigma * 1000, cond, resolution=res)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return {"case": case, "resolution": res, "batch": 1, "lora_rank": 32,
            "trainable_params": sum(p.numel() for p in params), "base_on_gpu_gib": round(base_gib, 2) if cuda else None,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "img_per_s": round(steps / seconds, 3), "load_s": round(load_s, 1),
            "finite_losses": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
            "device": torch.cuda.get_device_name() if cuda else str(dev)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(full_size_case(args.child, args.steps, args.resolution)))
        return
    if not args.full_size:
        with tempfile.TemporaryDirectory() as work:
            result = tiny_check(Path(work))
        print(json.dumps(result, indent=1))
        Path(args.out).write_text(json.dumps(result, indent=1))
        ok = result["base_bit_identical"] and result["adapters_moved"] >= 0.9 and result["lora_loads_in_diffusers"]
        sys.exit(0 if ok and result.get("same_packing_as_diffusers_loader", True) else 1)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--full-size needs a CUDA GPU (the Flux.1-dev transformer has 11.9 B parameters)")
    results = []
    for case in args.cases.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(args.steps),
                               "--resolution", str(args.resolution)], capture_output=True, text=True)
        if proc.returncode:
            results.append({"case": case, "error": proc.stderr[-2000:]})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
