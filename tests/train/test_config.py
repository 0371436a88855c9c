"""Bad configs fail before any work with the key, the allowed values and a "did you mean"."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthcxr.errors import ConfigError
from synthcxr.train.config import TrainConfig, config_differences, load_train_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _load(tmp_path: Path, text: str, overrides: list[str] | None = None) -> TrainConfig:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_train_config(path, overrides or [])


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "train:\n  bach_size: 4\n")
    msg = str(err.value)
    assert "train.bach_size" in msg and "did you mean 'train.batch_size'" in msg and "c.yaml" in msg


@pytest.mark.parametrize(("key", "value", "suggestion"), [
    ("optimizer.name", "prodigi", "prodigy"),
    ("optimizer.name", "adamw8", "adamw"),
    ("method.name", "dreambroth", "dreambooth"),
    ("schedule.name", "cosin", "cosine"),
])
def test_bad_registry_name_lists_allowed_values(tmp_path, key, value, suggestion):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "", [f"{key}={value}"])
    msg = str(err.value)
    assert key in msg and f"did you mean {suggestion!r}" in msg and "allowed:" in msg


def test_bad_enum_value_names_key_and_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "", ["train.mixed_precision=fp8"])
    msg = str(err.value)
    assert "train.mixed_precision" in msg and "'bf16'" in msg and "fp8" in msg


def test_adafactor_relative_step_rejects_an_lr(tmp_path):
    with pytest.raises(ConfigError, match="relative_step"):
        _load(tmp_path, "optimizer: {name: adafactor, relative_step: true, lr: 0.001}\n")


def test_lr_free_optimizer_defaults_to_one_and_warns_otherwise():
    from synthcxr.train.optimizers import check_optimizer_config

    cfg = TrainConfig.model_validate({"optimizer": {"name": "prodigy"}})
    assert cfg.optimizer.effective_lr == 1.0 and check_optimizer_config(cfg.optimizer) == []
    cfg = TrainConfig.model_validate({"optimizer": {"name": "dadaptation", "lr": 1e-4}})
    assert "expects lr=1.0" in check_optimizer_config(cfg.optimizer)[0]


def test_every_key_settable_with_set(tmp_path):
    cfg = _load(tmp_path, "", ["optimizer.lr=2e-4", "train.max_steps=7", "method.target_modules=[to_q,to_v]",
                               "data.captions.instance_token=zxq", "optimizer.options.d_coef=0.5"])
    assert cfg.optimizer.lr == 2e-4 and cfg.train.max_steps == 7
    assert cfg.method.target_modules == ["to_q", "to_v"] and cfg.data.captions.instance_token == "zxq"
    assert cfg.optimizer.options == {"d_coef": 0.5}


def test_config_differences_lists_changed_keys():
    a = TrainConfig()
    b = TrainConfig.model_validate({"optimizer": {"lr": 3e-4}, "train": {"max_steps": 10}})
    assert set(config_differences(a, b)) == {"optimizer.lr", "train.max_steps"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    if path.name == "study_grid.yaml" or path.name.startswith("demo"):
        pytest.skip("not a training config")
    cfg = load_train_config(path)
    assert cfg.method.name in path.stem or path.stem.startswith("tiny")
    assert cfg.optimizer.name in path.stem.split("_", 1)[1]
