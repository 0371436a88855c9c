"""`synthcxr train CONFIG [--set k=v]... [--out DIR] [--resume]`.

Several GPUs: `accelerate launch -m synthcxr train CONFIG` (accelerate's own config picks DDP etc.);
several CPU processes: `python -m torch.distributed.run --nproc_per_node 2 -m synthcxr train CONFIG`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train(
    config: Annotated[Path, typer.Argument(help="Training config YAML (see configs/).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set optimizer.lr=1e-4 (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<config name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its newest checkpoint.")] = False,
) -> None:
    """Fine-tune a model (DreamBooth, LoRA, full) from a YAML config; resumable with --resume."""
    from synthcxr.train.config import load_train_config

    cfg = load_train_config(config, set_ or [])  # fails on bad keys/values before anything heavy loads
    from synthcxr.train.loop import train as run_training

    run_training(cfg, out or Path("runs") / config.stem, resume=resume)
