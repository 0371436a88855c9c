#!/usr/bin/env python
"""Training-step throughput and peak memory of synthcxr against the diffusers-style reference step.

The reference is the step of `../shared/bench/sd15_step_anchor.py` (the way diffusers' DreamBooth /
DreamBooth-LoRA example scripts train), run here on the *same* model in the same run:

    VAE encode (x scaling) -> text encoder -> noise + random t -> add_noise -> UNet forward under
    autocast -> MSE(eps) -> backward -> clip_grad_norm_(1.0) -> AdamW -> zero_grad

"ours" is `synthcxr.train.loop.Session.train_step`, built by `setup()` from a normal training
config, with the switches the config offers: `ours_nocache` does the reference's work (VAE and
text encoder every step); `ours` caches latents + text embeddings (fused AdamW and channels-last on
GPUs); `ours_compile` adds torch.compile of the UNet. Each case runs in its own subprocess, so
peak memory is per case.

    python benchmarks/train_step.py                 # tiny model on the CPU, 64 px (a minute or two)
    python benchmarks/train_step.py --sd15          # SD1.5 architecture at 512 px on a GPU
    python benchmarks/train_step.py --sd15 --cases lora_bf16_bs4,full_bf16_bs4
    python benchmarks/train_step.py --optimizer came,lion,muon   # optimizer step + state vs AdamW

`--optimizer NAME[,NAME...]` compares optimizers instead of steps: the same model, method and data
train with AdamW and with each NAME (at its documented default lr); it reports the median time of
`optimizer.step()` alone and the bytes of optimizer state (every tensor in its state_dict: moments,
schedule-free averages, 8-bit blocks and their scales), each also as a ratio to AdamW's.

Results: a table on stdout and JSON (--out, default $OUT/train_step.json or /tmp/train_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SD15_TFLOP_PER_IMAGE = {"lora": 1.78, "full": 2.47}  # UNet training step, ../shared/bench/README.md

# name -> (method, precision, batch); each is run as "reference", "ours" and maybe "ours_compile"
CPU_CASES = {"lora_fp32_bs4": ("lora", "no", 4), "full_fp32_bs4": ("full", "no", 4)}
GPU_CASES = {"lora_bf16_bs4": ("lora", "bf16", 4), "lora_bf16_bs16": ("lora", "bf16", 16),
             "full_bf16_bs4": ("full", "bf16", 4), "full_bf16_bs16": ("full", "bf16", 16)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd15", action="store_true", help="SD1.5 architecture at 512 px (needs a GPU)")
    p.add_argument("--family", default=None, help="sdxl, sd3, ...: a tiny random model of that family against a "
                   "diffusers-example-style reference step (benchmarks/families.py); prints the ratio")
    p.add_argument("--cases", default="all", help="comma-separated case names")
    p.add_argument("--variants", default=None, help="reference,ours_nocache,ours,ours_compile "
                                                     "(default: all with --sd15, all but ours_compile on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak of the GPU (H100: 790)")
    p.add_argument("--workdir", default=None, help="where the random model and data are written (reused)")
    p.add_argument("--optimizer", default=None, help="compare these optimizers (comma-separated) with adamw")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.warmup = a.warmup if a.warmup is not None else (5 if a.sd15 else 2)
    a.steps = a.steps if a.steps is not None else (20 if a.sd15 else 6)
    if a.out is None:
        a.out = str(Path(os.environ["OUT"]) / "train_step.json") if os.environ.get("OUT") else "/tmp/train_step.json"
    return a


# --------------------------------------------------------------------------- model + data (parent)
def build_sd15_model(out: Path) -> Path:
    """The SD1.5 architecture (UNet, VAE, CLIP-L text encoder) with random weights, as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from synthcxr.models.tiny import write_tiny_tokenizer

    if (out / "model_index.json").exists():
        return out
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=768))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(Path(tmp))))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(out, safe_serialization=True)
    return out


def prepare(args: argparse.Namespace) -> tuple[Path, Path, int]:
    from synthcxr.data.fixtures import make_fixture_dataset
    from synthcxr.models.tiny import make_tiny_model

    work = Path(args.workdir or Path(tempfile.gettempdir()) / ("synthcxr_bench_sd15" if args.sd15 else "synthcxr_bench_tiny"))
    work.mkdir(parents=True, exist_ok=True)
    res = 512 if args.sd15 else 64
    model = work / "model"
    if args.sd15:
        build_sd15_model(model)
    elif not (model / "model_index.json").exists():
        make_tiny_model(model, sample_size=64)
    data_root = work / "data"
    if not data_root.exists():
        make_fixture_dataset(data_root, "shenzhen", n=16, size=res, seed=0)
    return model, data_root, res


# --------------------------------------------------------------------------- the two steps (child)
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reference_step(model: Path, data: Path, res: int, method: str, precision: str, bs: int):
    """sd15_step_anchor.make_train_setup, on the given model's weights."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wdtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(dev)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(dev, dtype=wdtype).eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(dev, dtype=wdtype).eval().requires_grad_(False)
    if method == "lora":
        unet.requires_grad_(False)
        unet.to(dtype=wdtype)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if precision == "fp16":
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        set_to_none = True
    else:
        params = list(unet.parameters())
        opt = torch.optim.AdamW(params, lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        set_to_none = False
    unet.train()
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator(device=dev).manual_seed(0)
    pixel = torch.rand(bs, 3, res, res, device=dev, generator=g).mul_(2).sub_(1).to(wdtype)
    ids = torch.randint(0, te.config.vocab_size, (bs, 77), device=dev, generator=g)
    scale = vae.config.scaling_factor
    autocast = torch.autocast(dev.type, dtype=wdtype, enabled=precision != "no")

    def step():
        with torch.no_grad():
            latents = vae.encode(pixel).latent_dist.sample() * scale
            ehs = te(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,), device=dev).long()
        noisy = sched.add_noise(latents, noise, t)
        with autocast:
            pred = unet(noisy, t, ehs, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        return loss.detach()

    return step, sum(p.numel() for p in params)


def ours_step(model: Path, data: Path, res: int, method: str, precision: str, bs: int, variant: str,
              total: int, run_dir: Path):
    """synthcxr's own step, built from a training config (the switches a user sets in YAML).

    Variant "opt:NAME" is `ours` with optimizer NAME at its default lr; the optimizer comes back too."""
    import torch

    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.loop import setup

    on_gpu = torch.cuda.is_available()
    cfg = build_config(TrainConfig, {
        "model": {"path": str(model)},
        "data": {"path": str(data), "resolution": res, "split": {"val": 0.0, "test": 0.0}},
        "method": {"name": method, "rank": 4, "alpha": 4},
        "optimizer": ({"name": variant[4:], "lr": None} if variant.startswith("opt:")
                      else {"name": "adamw", "lr": 1e-4 if method == "lora" else 5e-6, "weight_decay": 1e-2}),
        "train": {"max_steps": total, "batch_size": bs, "mixed_precision": precision,
                  "cache_latents": "none" if variant == "ours_nocache" else "ram",
                  "channels_last": on_gpu, "compile": "default" if variant == "ours_compile" else "none",
                  "checkpoint_every": 10**9, "log_every": 10**9, "validation_seeds": [], "max_grad_norm": 1.0},
    })
    session = setup(cfg, run_dir)
    batches = session.batches()
    return ((lambda: session.train_step(batches)), sum(p.numel() for p in session.trainable.values()),
            getattr(session.optimizer, "optimizer", session.optimizer))


def build_step(spec: dict, variant: str, total: int, run_dir: Path):
    model, data, res = Path(spec["model"]), Path(spec["data"]), spec["res"]
    if variant == "reference":
        return (*reference_step(model, data, res, spec["method"], spec["precision"], spec["bs"]), None)
    return ours_step(model, data, res, spec["method"], spec["precision"], spec["bs"], variant, total, run_dir)


def child(args: argparse.Namespace) -> None:
    """Time the variants of one case. Several variants are built side by side and their steps
    alternate, so load from other programs on the machine hits them equally; peak memory is only
    reported for a single-variant child."""
    import resource

    import torch

    spec = json.loads(args.child)
    variants = spec["variants"]
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    total = args.warmup + args.steps
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        steps = {v: build_step(spec, v, total, Path(tmp) / v.replace(":", "_")) for v in variants}
        opt_times: dict[str, list[float]] = {v: [] for v in variants}
        for v, (_, _, optimizer) in steps.items():
            if optimizer is not None:
                optimizer.step = _timed(optimizer.step, opt_times[v])
        times: dict[str, list[float]] = {v: [] for v in variants}
        first: dict[str, float] = {}
        losses = {}
        for i in range(total):
            for v, (step, _, _) in steps.items():
                sync()
                t0 = time.perf_counter()
                losses[v] = step()
                sync()
                dt = time.perf_counter() - t0
                first.setdefault(v, dt)
                if i >= args.warmup:
                    times[v].append(dt)
        for v in variants:
            med = statistics.median(times[v])
            results[v] = {"median_ms": 1e3 * med, "first_step_s": first[v], "n_timed": len(times[v]),
                          "img_per_s": spec["bs"] / med, "trainable_params": steps[v][1],
                          "loss_finite": bool(torch.isfinite(losses[v]).item())}
            if steps[v][2] is not None:
                results[v].update(opt_step_ms=1e3 * statistics.median(opt_times[v][args.warmup:]),
                                  state_mib=optimizer_state_bytes(steps[v][2]) / 2**20)
    if len(variants) == 1:
        if torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"
        results[variants[0]].update(peak_mem_gib=peak, peak_kind=kind)
    print("RESULT " + json.dumps(results), flush=True)


def _timed(step, out: list[float]):
    """optimizer.step, timed (device synchronised around it)."""
    def timed(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        result = step(*args, **kwargs)
        sync()
        out.append(time.perf_counter() - t0)
        return result

    return timed


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state_dict (per-parameter state and per-group tensors)."""
    import torch

    seen: set[int] = set()

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(optimizer.state_dict())


def run_child(spec: dict, warmup: int, steps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--warmup", str(warmup),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {v: {"status": "failed", "error": proc.stderr[-1500:]} for v in spec["variants"]}
    return {v: {"status": "ok", **r} for v, r in json.loads(line[7:]).items()}


# --------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.family:
        sys.path.insert(0, str(Path(__file__).parent))
        from families import train_step_benchmark

        train_step_benchmark(args.family, steps=args.steps or 4, warmup=args.warmup or 2, out=args.out)
        return None
    import torch

    if args.sd15 and not torch.cuda.is_available():
        sys.exit("--sd15 needs a GPU (SD1.5 at 512 px takes minutes per step on a CPU)")
    cases = GPU_CASES if args.sd15 else CPU_CASES
    wanted = list(cases) if args.cases == "all" else args.cases.split(",")
    if args.optimizer:
        return compare_optimizers(args, cases, wanted)
    variants = (args.variants or ("reference,ours_nocache,ours,ours_compile" if args.sd15
                                  else "reference,ours_nocache,ours")).split(",")
    model, data, res = prepare(args)
    env = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "warmup": args.warmup, "steps": args.steps,
           "resolution": res}
    results: dict[str, dict] = {}
    for name in wanted:
        method, precision, bs = cases[name]
        base = {"model": str(model), "data": str(data), "res": res, "method": method, "precision": precision, "bs": bs}
        if args.sd15:  # a dedicated GPU: one process per variant gives both speed and peak memory
            for variant in variants:
                results[f"{name}/{variant}"] = run_child({**base, "variants": [variant]}, args.warmup, args.steps)[variant]
        else:  # a shared CPU: speed from alternating steps in one process, memory from one process each
            speed = run_child({**base, "variants": variants}, args.warmup, args.steps)
            for variant in variants:
                mem = run_child({**base, "variants": [variant]}, 1, 1)[variant]
                results[f"{name}/{variant}"] = {**speed[variant], "peak_mem_gib": mem.get("peak_mem_gib"),
                                                "peak_kind": mem.get("peak_kind")}
        for variant in variants:
            print(f"{name}/{variant}: {json.dumps(results[f'{name}/{variant}'])[:300]}", file=sys.stderr, flush=True)
    rows = []
    for name in wanted:
        ref = results.get(f"{name}/reference", {})
        for variant in variants:
            r = results.get(f"{name}/{variant}", {})
            if r.get("status") != "ok":
                rows.append((name, variant, None, None, None, None, None))
                continue
            ok = ref.get("status") == "ok"
            speed = r["img_per_s"] / ref["img_per_s"] if ok else None
            mem = r["peak_mem_gib"] / ref["peak_mem_gib"] if ok and r.get("peak_mem_gib") and ref.get("peak_mem_gib") else None
            pct = None
            if args.sd15:
                method = cases[name][0]
                pct = 100 * r["img_per_s"] * SD15_TFLOP_PER_IMAGE[method] / args.peak_tflops
            r.update(speed_vs_reference=speed, peak_mem_vs_reference=mem, pct_of_bf16_peak=pct)
            rows.append((name, variant, r["img_per_s"], r.get("peak_mem_gib"), speed, mem, pct))
    print(f"\ntraining step on {env['device']} (torch {env['torch']}, {res} px, median of {args.steps} steps after "
          f"{args.warmup} warm-up)")
    print(f"{'case':18s} {'variant':13s} {'img/s':>8s} {'peak GiB':>9s} {'x ref speed':>11s} {'x ref mem':>9s} {'%peak':>6s}")
    for name, variant, ips, mem, speed, memr, pct in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        print(f"{name:18s} {variant:13s} {f(ips, '8.2f')} {f(mem, '9.2f')} {f(speed, '11.2f')} {f(memr, '9.2f')} {f(pct, '6.1f')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=1))
    print(f"results written to {args.out}")


def compare_optimizers(args: argparse.Namespace, cases: dict, wanted: list[str]) -> None:
    """Optimizer-step time and state memory of each --optimizer against AdamW, same model and data.

    On a CPU all optimizers of a case train side by side in one process with alternating steps (load
    from other programs hits them alike); with --sd15 each runs in its own process (GPU memory)."""
    import torch

    names = ["adamw"] + [n for n in args.optimizer.split(",") if n != "adamw"]
    variants = [f"opt:{n}" for n in names]
    model, data, res = prepare(args)
    env = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "warmup": args.warmup, "steps": args.steps, "resolution": res}
    results: dict[str, dict] = {}
    for name in wanted:
        method, precision, bs = cases[name]
        base = {"model": str(model), "data": str(data), "res": res, "method": method, "precision": precision, "bs": bs}
        if args.sd15:
            got = {v: run_child({**base, "variants": [v]}, args.warmup, args.steps)[v] for v in variants}
        else:
            got = run_child({**base, "variants": variants}, args.warmup, args.steps)
        for v in variants:
            results[f"{name}/{v[4:]}"] = got[v]
            print(f"{name}/{v[4:]}: {json.dumps(got[v])[:300]}", file=sys.stderr, flush=True)
    print(f"\noptimizer step on {env['device']} (torch {env['torch']}, {res} px, median of {args.steps} steps "
          f"after {args.warmup} warm-up)")
    print(f"{'case':15s} {'optimizer':21s} {'step ms':>9s} {'x adamw':>8s} {'state MiB':>10s} {'x adamw':>8s} "
          f"{'img/s':>7s}")
    for name in wanted:
        ref = results.get(f"{name}/adamw", {})
        for opt in names:
            r = results[f"{name}/{opt}"]
            if r.get("status") != "ok":
                print(f"{name:15s} {opt:21s} failed: {r.get('error', '')[-200:]}")
                continue
            ok = ref.get("status") == "ok"
            r["opt_step_vs_adamw"] = r["opt_step_ms"] / ref["opt_step_ms"] if ok else None
            r["state_vs_adamw"] = r["state_mib"] / ref["state_mib"] if ok and ref["state_mib"] else None
            print(f"{name:15s} {opt:21s} {r['opt_step_ms']:9.2f} {r['opt_step_vs_adamw'] or 0:8.2f} "
                  f"{r['state_mib']:10.3f} {r['state_vs_adamw'] or 0:8.2f} {r['img_per_s']:7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=1))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
