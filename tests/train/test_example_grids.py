"""configs/optimizer_grid.yaml: the seed study's six optimizers and the seven newer ones on LoRA, plus
LoHa/LoKr/OFT with AdamW, each run a valid training config."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_optimizer_grid_compares_every_optimizer_and_adapter():
    from synthcxr.grid.expand import load_plan
    from synthcxr.train.optimizers import OPTIMIZERS

    plan = load_plan(REPO / "configs" / "optimizer_grid.yaml")
    trained = [r for r in plan.runs if not r.is_baseline]
    assert plan.runs[0].is_baseline
    lora_runs = {r.train["optimizer"]["name"] for r in trained if r.train["method"]["name"] == "lora"}
    assert lora_runs == set(OPTIMIZERS)  # every registered optimizer, none missing
    assert {r.train["method"]["name"] for r in trained} == {"lora", "loha", "lokr", "oft"}
    by_name = {r.name: r.train for r in trained}
    for name in ("schedulefree_adamw", "prodigy_schedulefree"):  # schedule-free: no schedule on top
        assert by_name[name]["schedule"]["name"] == "constant" and by_name[name]["schedule"]["warmup_steps"] == 0
    assert list(by_name["lion"]["optimizer"]["betas"]) == [0.9, 0.99]
