"""configs/ has one example per part-2 family, as the public benchmark trains them: PixArt-Σ and Sana full
fine-tuning, Flux.1-dev LoRA r32 on an NF4 base; each passes the family's own checks (on a tiny model of
that family standing in for the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(("name", "family", "method"), [("pixart_full_adamw", "pixart", "full"),
                                                        ("sana_full_adamw", "sana", "full"),
                                                        ("flux_qlora_adamw", "flux", "lora")])
def test_family_example_config(name, family, method, tiny_family_model):
    from synthcxr.models.families import get_family
    from synthcxr.train.config import load_train_config
    from synthcxr.train.family_checks import check_family_config

    cfg = load_train_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.family == family and cfg.method.name == method
    assert cfg.train.mixed_precision == "bf16" and cfg.train.gradient_checkpointing
    if family == "flux":
        assert cfg.model.quantize == "nf4" and cfg.method.rank == 32 and cfg.train.batch_size == 1
    tiny = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(tiny_family_model(family))})})
    assert check_family_config(tiny) is get_family(family)
