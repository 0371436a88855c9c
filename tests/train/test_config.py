"""Bad configs fail before any work with the key, the allowed values and a "did you mean"."""

from __future__ import annotations

import re
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
    cfg = _load(tmp_path, "", ["optimizer.name=prodigy", "optimizer.lr=2e-4", "train.max_steps=7",
                               "method.target_modules=[to_q,to_v]",
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
    if path.name.endswith("grid.yaml") or path.name.startswith("demo"):
        pytest.skip("not a training config")
    cfg = load_train_config(path)
    assert cfg.method.name in path.stem or path.stem.startswith("tiny")
    assert cfg.optimizer.name in path.stem.split("_", 1)[1]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_one_example_config_per_family(family):
    """configs/<family>_lora_adamw.yaml names its family and passes the family's own checks (no min-SNR
    or prediction_type on a flow-matching family; a resolution its VAE and patch size take)."""
    from synthcxr.models.families import get_family

    cfg = load_train_config(CONFIGS / f"{family}_lora_adamw.yaml")
    fam = get_family(family)
    assert cfg.model.family == family and cfg.method.name == "lora" and cfg.optimizer.name == "adamw"
    assert cfg.data.resolution == fam.sample.resolution
    if fam.objective == "flow":
        assert cfg.train.min_snr_gamma is None and cfg.model.prediction_type is None


@pytest.mark.parametrize(("override", "key", "words"), [
    ("optimizer.lr=-1", "optimizer.lr", "must be > 0"),
    ("optimizer.lr=0", "optimizer.lr", "must be > 0"),
    ("optimizer.lr=.nan", "optimizer.lr", "finite"),
    ("optimizer.eps=0", "optimizer.eps", "must be > 0"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas", "[0, 1)"),
    ("optimizer.betas=[-0.1,0.999]", "optimizer.betas", "[0, 1)"),
    ("optimizer.weight_decay=.inf", "optimizer.weight_decay", "finite"),
    ("schedule.power=0", "schedule.power", "greater than 0"),
    ("method.alpha=0", "method.alpha", "greater than 0"),
    ("method.text_encoder_lr=-1e-5", "method.text_encoder_lr", "greater than 0"),
    ("method.class_image_guidance=-1", "method.class_image_guidance", "greater than or equal to 0"),
    ("train.seed=-1", "train.seed", "greater than or equal to 0"),
    ("train.seed=4294967296", "train.seed", "less than"),
    ("train.validation_seeds=[0,-2]", "train.validation_seeds.1", "greater than or equal to 0"),
    ("train.validation_guidance=-2", "train.validation_guidance", "greater than or equal to 0"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm", "finite"),
])
def test_bad_numbers_fail_at_load_naming_the_key(tmp_path, override, key, words):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "", [override])
    msg = str(err.value)
    assert key in msg and words in msg and "Fix:" in msg


@pytest.mark.parametrize(("yaml_text", "words"), [
    ("optimizer: {name: adamw, options: {amsgrad: true, d_coef: 2}}",
     ["optimizer adamw has no option 'd_coef'", "it takes: amsgrad"]),
    ("optimizer: {name: prodigy, options: {d_cof: 2}}", ["no option 'd_cof'", "did you mean 'd_coef'"]),
    ("optimizer: {name: prodigy, options: {d_coef: -1}}", ["options.d_coef", "greater than 0"]),
    ("optimizer: {name: prodigy, options: {beta3: 1.5}}", ["options.beta3", "less than 1"]),
    ("optimizer: {name: adafactor, options: {decay_rate: 0.8}}", ["options.decay_rate", "less than 0"]),
    ("optimizer: {name: adamw8bit, options: {is_paged: maybe}}", ["options.is_paged", "boolean"]),
    ("optimizer: {name: adamw, options: {lr: 0.1}}", ["set optimizer.lr instead of optimizer.options.lr"]),
])
def test_optimizer_options_are_checked_at_load(tmp_path, yaml_text, words):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, yaml_text + "\n")
    msg = str(err.value)
    assert "optimizer.options" in msg and all(w in msg for w in words), msg


def test_every_registered_optimizer_has_typed_options_and_takes_them():
    """Each entry's Options fields are keyword arguments its optimizer accepts (no spec drifts from the library)."""
    import torch

    from synthcxr.train.optimizers import OPTIMIZERS, OPTIONS, build_optimizer

    assert set(OPTIONS) == set(OPTIMIZERS)
    samples = {"bool": False, "int": 1, "float": 0.5}
    for name, spec in OPTIONS.items():
        for key, field in spec.model_fields.items():
            text = str(field.annotation)
            kind = next((k for k in samples if re.search(rf"(^|\[){k}\b", text)), None)
            if text.startswith("tuple") or (name, key) == ("adamw8bit", "is_paged"):  # paged states need CUDA
                continue
            value = -0.8 if key == "decay_rate" else samples[kind]
            cfg = TrainConfig.model_validate({"optimizer": {"name": name, "options": {key: value}}}).optimizer
            try:
                build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2, 2))]}], cfg)
            except ConfigError as exc:  # the library refused a key the spec allows
                pytest.fail(f"{name}: {exc}")
            except Exception as exc:  # noqa: BLE001 - other refusals (device, combination) are fine here
                assert "unexpected keyword" not in str(exc), (name, key, exc)
