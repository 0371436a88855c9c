"""`synthcxr privacy ...`: train a patient re-identification network."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("train-reid")
def train_reid_command(
    data: Annotated[list[Path] | None, typer.Option("--data", help="Data set folder(s) with several images per patient "
                                                     "(NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, or a manifest with patient_id).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for reid.pt (the network + thresholds) and reid.json.")] = Path("reid"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML with `data:` and `reid:` sections.")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set reid.steps=500 --set "
                                                   "reid.model.backbone=resnet18 --set data.format=nih (repeatable).")] = None,
) -> None:
    """Train a Siamese patient-verification network (ResNet-50 by default) on training patients; report
    its verification AUC on held-out patients and save it with thresholds at a 1% false-match rate."""
    from rich.console import Console

    from synthcxr.config import apply_overrides, build_config, read_yaml
    from synthcxr.data.commands import data_config
    from synthcxr.data.dataset import load_records
    from synthcxr.errors import ConfigError
    from synthcxr.privacy.reid import ReidTrainConfig, train_reid

    doc: dict[str, Any] = read_yaml(config) if config else {}
    doc = apply_overrides(doc, sets or [])
    unknown = sorted(set(doc) - {"data", "reid"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in {config or 'the --set options'}",
                          fix="use data.* (the data set) and reid.* (the network and training)")
    data_doc = doc.get("data") or {}
    if data:
        data_doc["path"] = [str(p) for p in data] if len(data) > 1 else str(data[0])
    if "path" not in data_doc:
        raise ConfigError("no data set given", fix="pass --data FOLDER (or data.path in --config)")
    data_cfg = data_config(None, None, [], **data_doc)
    cfg = build_config(ReidTrainConfig, doc.get("reid") or {}, str(config) if config else "command line")
    records = load_records(data_cfg)
    summary = train_reid(records, cfg, out)
    auc = summary["verification_auc"]
    ci = f" (95% CI {auc['ci'][0]:.3f}-{auc['ci'][1]:.3f})" if auc.get("ci") else ""
    cal = summary["calibration"]
    Console(highlight=False).print(
        f"verification AUC {auc['value']:.4f}{ci} on {auc['n_patients']} held-out patients; "
        f"threshold at {cal['fmr']:.0%} false matches: {cal['search_threshold']:.4f} (search), "
        f"{cal['pair_threshold']:.4f} (pairs)\nsaved {out / 'reid.pt'} and {out / 'reid.json'}")
