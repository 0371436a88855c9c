"""`synthcxr evaluate`: options -> `EvaluateConfig` -> `evaluate()` -> a printed table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def evaluate(
    real: Annotated[Path | None, typer.Option("--real", help="Real reference images (folder, or Montgomery/Shenzhen set).")] = None,
    fake: Annotated[Path | None, typer.Option("--fake", help="Synthetic images (folder, or a generate folder with manifest.jsonl).")] = None,
    train: Annotated[Path | None, typer.Option("--train", help="The generator's real training images (memorization, classifier).")] = None,
    test: Annotated[Path | None, typer.Option("--test", help="Real held-out test images for the classifier.")] = None,
    split: Annotated[Path | None, typer.Option("--split", help="Saved patient-level split of --train (e.g. a run's splits.json): the classifier is tested on its test patients.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Results JSON (written atomically).")] = None,
    extractor: Annotated[str | None, typer.Option("--extractor", help="inception | xrv | random | timm:NAME | torchvision:NAME | dinov2 | raddino | clip")] = None,
    metrics: Annotated[str | None, typer.Option("--metrics", help="Comma list of fidelity,diversity,memorization,utility (default) and cmmd,reid.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with EvaluateConfig keys.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set fidelity.ci_groups=10")] = None,
) -> None:
    """Fidelity (FID/KID/PRDC), diversity (MS-SSIM), memorization and classifier utility of synthetic images."""
    from synthcxr.config import apply_overrides, build_config, read_yaml
    from synthcxr.evaluate.run import EvaluateConfig
    from synthcxr.evaluate.run import evaluate as run_evaluate

    data: dict[str, Any] = read_yaml(config) if config else {}
    for key, value in (("real", real), ("fake", fake), ("train", train), ("test", test), ("split", split), ("out", out)):
        if value is not None:
            data[key] = str(value)
    if extractor is not None:
        data.setdefault("extractor", {})["name"] = extractor
    if metrics is not None:
        data["metrics"] = [m.strip() for m in metrics.split(",") if m.strip()]
    data = apply_overrides(data, overrides or [])
    cfg = build_config(EvaluateConfig, data, str(config) if config else "command line")
    from synthcxr.generate.shard import Shard

    shard = Shard.from_env()  # torchrun / accelerate launch: the ranks share the feature extraction
    if shard.world > 1:
        from synthcxr.evaluate.distributed import evaluate_ranks

        results = evaluate_ranks(cfg, shard)
        if results is None:  # not rank 0: its features are in the cache, rank 0 writes the results
            return
    else:
        results = run_evaluate(cfg)
    print_results(results, cfg.out)


def _ci(entry: dict[str, Any], key: str = "value", digits: int = 4) -> tuple[str, str]:
    lo, hi = entry.get("ci") or [None, None]
    ci = f"[{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else ""
    return f"{entry[key]:.{digits}f}", ci


def results_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, value, CI, note) rows for the printed table (also used by tests)."""
    rows: list[tuple[str, str, str, str]] = []
    fid = results.get("fidelity")
    if fid:
        n = f"{fid['n_real']} real / {fid['n_fake']} synthetic"
        rows.append(("FID", *_ci(fid["fid"], digits=3), n))
        kid = fid["kid"]
        rows.append(("KID", f"{kid['mean']:.5f} ± {kid['std']:.5f}", _ci(kid, "mean", 5)[1],
                     f"{kid['subsets']} subsets of {kid['subset_size']}"))
        for key in ("precision", "recall", "density", "coverage"):
            rows.append((key.capitalize(), *_ci(fid[key], digits=3), f"k={fid['prdc_k']}"))
    for table in results.get("fidelity_by_extractor") or []:
        name = table["extractor"]["name"] + ("" if table.get("extractor_pretrained", True) else ", random weights")
        rows.append((f"FD ({name})", *_ci(table["fid"], digits=3), f"{table['n_real']} real / {table['n_fake']} synthetic"))
        rows.append((f"KID ({name})", f"{table['kid']['mean']:.5f}", _ci(table["kid"], "mean", 5)[1], ""))
        for key in ("precision", "recall"):
            rows.append((f"{key.capitalize()} ({name})", *_ci(table[key], digits=3), f"k={table['prdc_k']}"))
    cm = results.get("cmmd")
    if cm:
        name = cm["extractor"]["name"] + ("" if cm.get("extractor_pretrained", True) else ", random weights")
        rows.append((f"CMMD ({name})", *_ci(cm, digits=4), f"sigma={cm['sigma']:g}, x{cm['scale']:g}"))
    div = results.get("diversity")
    if div:
        for role in ("synthetic", "real"):
            d = div[role]
            rows.append((f"MS-SSIM {role}", f"{d['mean']:.4f}", _ci(d, "mean")[1], f"{d['n_pairs']} pairs, {d['scales']} scales"))
    mem = results.get("memorization")
    if mem:
        th = mem["thresholds"]
        cal = mem["calibration"]
        rows.append(("Nearest-train copy similarity (max)", f"{mem['copy_similarity']['max']:.4f}", "",
                     f"threshold {th['copy_similarity']['threshold']:.4f}"))
        rows.append(("Nearest-train cosine (max)", f"{mem['feature_cosine']['max']:.4f}", "",
                     f"threshold {th['feature_cosine']['threshold']:.4f}" if mem["flag_by_features"]
                     else "flags nothing (random-weight extractor)"))
        null = (f"q={cal['quantile']:g} of {cal['n_null']} {cal['null']} real images, "
                f"{th['copy_similarity'].get('null_above', 0)} above" if cal["null"] != "none" else "fallback thresholds")
        rows.append(("Flagged near-copies", str(mem["n_flagged"]), "", f"of {mem['n_synthetic']} synthetic; {null}"))
    reid = results.get("reid")
    if reid and reid.get("score"):
        rows.append(("Re-ID score (mean)", f"{reid['score']['mean']:.4f}", "", f"max {reid['score']['max']:.4f}"))
        rows.append(("Re-ID above threshold", f"{reid['n_above']} ({reid['fraction_above']:.1%})", "",
                     f"threshold {reid['threshold']:.3f} at {reid.get('fmr') or 0:.0%} false matches"))
    util = results.get("utility")
    if util:
        rows += utility_rows(util)
    return rows


def utility_rows(util: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Classifier AUCs (mean over seeds), gains over real, conditioning; a skipped one is a row saying why."""
    rows: list[tuple[str, str, str, str]] = []
    seeds = len((util.get("protocol") or {}).get("seeds") or [])
    for variant in ("real", "synthetic", "real+synthetic"):
        entry = util.get(variant)
        if not isinstance(entry, dict):
            continue
        if "skipped" in entry:
            rows.append((f"AUC trained on {variant}", "–", "", f"skipped: {entry['skipped']}"))
            continue
        note = f"{entry['n_train']} train / {entry['n_test']} test images" + (f", {seeds} seeds" if seeds else "")
        rows.append((f"AUC trained on {variant}", *_ci(entry, "auc", 3), note))
        gain = entry.get("minus_real")
        if gain:
            rows.append((f"  {variant} − real", f"{gain['value']:+.3f}", _ci(gain, digits=3)[1],
                         "significant" if gain["significant"] else "not significant (CI includes 0)"))
    protocol = util.get("protocol")
    if protocol:
        rows.append(("  protocol", "", "", f"equal steps ({protocol['max_steps']}), early stopping on real validation, "
                                           "measured on real test patients"))
    for attr, what in (util.get("conditioning") or {}).items():
        if "skipped" in what:
            rows.append((f"Conditioning ({attr})", "–", "", f"not measured: {what['skipped']}"))
            continue
        rows.append((f"Conditioning AUC ({attr})", *_ci(what["auc"], digits=3), f"{what['n']} synthetic, real-trained classifier"))
        bacc = what.get("balanced_accuracy") or {}
        if "skipped" in bacc:
            rows.append((f"Conditioning balanced acc. ({attr})", "–", "", f"not measured: {bacc['skipped']}"))
        elif bacc:
            rows.append((f"Conditioning balanced acc. ({attr})", *_ci(bacc, digits=3),
                         "COLLAPSED to one class" if what.get("collapsed") else "threshold from real validation"))
    return rows


def print_results(results: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    ext = results.get("extractor") or {}
    untrained = ", random weights: not comparable" if ext.get("pretrained") is False else ""
    table = Table(title=f"synthcxr evaluate ({ext.get('name', 'no features')}{untrained})")
    for col in ("metric", "value", "CI"):
        table.add_column(col, no_wrap=True)
    table.add_column("note")
    for row in results_rows(results):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # files and pipes: wide enough that notes do not wrap letter by letter
        console = Console(width=140)
    console.print(table)
    if results.get("warnings"):  # each was logged above the table as it arose
        console.print(f"[yellow]{len(results['warnings'])} warning(s)[/yellow], listed above and in the results JSON",
                      highlight=False)
    console.print(f"results: {out}", highlight=False)
