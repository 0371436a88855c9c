"""The optimizers 2026 fine-tuning tools add (schedule-free AdamW and Prodigy, CAME, Lion, 8-bit Lion,
ADOPT, Muon): each trains LoRA and full weights on the tiny model, bad options fail at load, and a
schedule-free optimizer validates and exports its averaged weights without disturbing training."""

from __future__ import annotations

import math

import pytest
import torch

from synthcxr.errors import ConfigError
from synthcxr.fileio import read_jsonl

NEW_OPTIMIZERS = ("schedulefree_adamw", "prodigy_schedulefree", "came", "lion", "lion8bit", "adopt", "muon")
SCHEDULE_FREE = ("schedulefree_adamw", "prodigy_schedulefree")


def _snapshot(session):
    modules = {"unet": session.models.unet, "vae": session.models.vae, "text_encoder": session.models.text_encoder}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("optimizer", NEW_OPTIMIZERS)
def test_new_optimizer_trains_what_it_should(optimizer, method, make_config, tmp_path):
    from synthcxr.train.loop import fit, setup

    # each optimizer at its documented default lr (optimizer.lr unset), as a user would start
    cfg = make_config(method={"name": method}, optimizer={"name": optimizer, "lr": None},
                      train={"max_steps": 3, "batch_size": 1, "checkpoint_every": 3})
    session = setup(cfg, tmp_path / "run")
    before = _snapshot(session)
    fit(session)
    after = _snapshot(session)
    trainable = set(session.trainable)
    moved = {k for k in trainable if not torch.equal(before[k], after[k])}
    frozen_moved = [k for k in after if k not in trainable and not torch.equal(before[k], after[k])]
    assert len(moved) >= 0.9 * len(trainable), f"only {len(moved)}/{len(trainable)} trainable tensors changed"
    assert frozen_moved == []
    if method == "lora":
        assert all("lora_" in k for k in trainable)
    else:
        assert len(trainable) == sum(1 for k in after if k.startswith("unet."))
    losses = [r["loss"] for r in read_jsonl(session.run.metrics) if r.get("kind") == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    if optimizer == "muon":  # matrices on Muon, the rest (conv kernels, biases, norms) on AdamW
        groups = session.optimizer.param_groups
        assert all(p.ndim == 2 for g in groups if g["use_muon"] for p in g["params"])
        assert all(p.ndim != 2 for g in groups if not g["use_muon"] for p in g["params"])
        assert any(not g["use_muon"] for g in groups) == (method == "full")


def test_muon_without_matrices_is_a_clear_error():
    from synthcxr.train.config import TrainConfig
    from synthcxr.train.optimizers import build_optimizer

    cfg = TrainConfig.model_validate({"optimizer": {"name": "muon"}}).optimizer
    params = [torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(4, 4, 3, 3))]
    with pytest.raises(ConfigError) as err:
        build_optimizer([{"params": params}], cfg)
    assert "no 2-D weight matrix" in str(err.value) and "another optimizer" in str(err.value)


@pytest.mark.parametrize(("options", "words"), [
    ({"name": "muon", "options": {"momentum": 1.5}}, ["options.momentum", "less than 1"]),
    ({"name": "muon", "options": {"ns_step": 3}}, ["no option 'ns_step'", "did you mean 'ns_steps'"]),
    ({"name": "came", "options": {"eps1": -1}}, ["options.eps1", "greater than 0"]),
    ({"name": "lion", "options": {"amsgrad": True}}, ["optimizer lion has no option 'amsgrad'"]),
    ({"name": "schedulefree_adamw", "options": {"warmup_steps": -5}}, ["options.warmup_steps"]),
    ({"name": "prodigy_schedulefree", "options": {"d_coef": 0}}, ["options.d_coef", "greater than 0"]),
    ({"name": "adopt", "options": {"betas": [0.9, 0.99]}}, ["set optimizer.betas instead"]),
])
def test_bad_options_of_new_optimizers_fail_at_load(tmp_path, options, words):
    import yaml

    from synthcxr.train.config import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optimizer": options}))
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    msg = str(err.value)
    assert "optimizer.options" in msg and all(w in msg for w in words), msg


def test_documented_default_lrs():
    from synthcxr.train.config import TrainConfig

    def lr(name):
        return TrainConfig.model_validate({"optimizer": {"name": name}}).optimizer.effective_lr

    assert lr("prodigy_schedulefree") == 1.0 and lr("lion") < lr("adamw") == lr("muon") == lr("came") == 1e-4


def test_schedule_on_a_schedule_free_optimizer_warns(make_config, caplog):
    from synthcxr.train.optimizers import check_schedule

    cfg = make_config(optimizer={"name": "schedulefree_adamw"}, schedule={"name": "cosine"})
    assert "schedule-free" in check_schedule(cfg.optimizer, cfg.schedule)[0]
    assert check_schedule(make_config(optimizer={"name": "schedulefree_adamw"}).optimizer, cfg.schedule.__class__()) == []


@pytest.mark.parametrize("optimizer", SCHEDULE_FREE)
def test_schedule_free_validates_and_exports_the_averaged_weights(optimizer, make_config, tmp_path):
    """Validation scores the averaged (evaluation) weights and the export holds them, while training
    continues from exactly the weights it had: a run that validates every step ends identical to one
    that never does."""
    from safetensors.torch import load_file

    from synthcxr.train.loop import finish, fit, setup
    from synthcxr.train.optimizers import evaluation_weights

    def run(name, validate_every):
        cfg = make_config(optimizer={"name": optimizer, "lr": None if optimizer != "schedulefree_adamw" else 1e-2},
                          data={"split": {"val": 0.25, "test": 0.0}},
                          train={"max_steps": 3, "validate_every": validate_every})
        session = setup(cfg, tmp_path / name)
        fit(session)
        return session

    quiet, busy = run("quiet", None), run("busy", 1)
    for name, param in quiet.trainable.items():
        assert torch.equal(param, busy.trainable[name]), name
    rows = lambda s: [(r["step"], r["loss"]) for r in read_jsonl(s.run.metrics) if r.get("kind") == "train"]  # noqa: E731
    assert rows(quiet) == rows(busy)

    training = {k: p.detach().clone() for k, p in quiet.trainable.items()}
    params = list(quiet.trainable.values())
    with evaluation_weights(quiet.optimizer, params):
        averaged = {k: p.detach().clone() for k, p in quiet.trainable.items()}
        val_loss = quiet.validate(3)["val_loss"]
    assert any(not torch.equal(training[k], averaged[k]) for k in training), "no separate evaluation weights"
    assert all(torch.equal(training[k], p) for k, p in quiet.trainable.items()), "training weights not restored"
    assert quiet.validate(3)["val_loss"] == val_loss  # validate() switches to the averaged weights itself

    finish(quiet)
    exported = load_file(str(quiet.run.root / "final" / "pytorch_lora_weights.safetensors"))

    def diffusers_name(name):  # peft's lora_A/lora_B.default -> the file's lora.down/lora.up
        return name.replace(".lora_A.default.", ".lora.down.").replace(".lora_B.default.", ".lora.up.")

    assert set(exported) == {diffusers_name(k) for k in averaged}
    for name, value in averaged.items():
        assert torch.equal(exported[diffusers_name(name)], value), name


@pytest.mark.parametrize("optimizer", SCHEDULE_FREE)
def test_ema_on_a_schedule_free_optimizer_is_refused_at_load(optimizer):
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, {"optimizer": {"name": optimizer}, "train": {"ema": True}})
    assert "already averages its weights" in str(err.value) and "train.ema=false" in str(err.value)


def test_muon_with_oft_is_refused_at_load():
    from synthcxr.config import build_config
    from synthcxr.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, {"optimizer": {"name": "muon"}, "method": {"name": "oft"}})
    assert "not matrices" in str(err.value) and "adamw" in str(err.value)
