"""Optimizer and learning-rate schedule registries: a name in the config -> a small factory.

Each factory takes parameter groups (dicts with "params" and optionally "lr") and the optimizer
section; it never looks at the method, so every method works with every optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from synthcxr.errors import ConfigError, TrainingError
from synthcxr.logging_utils import get_logger
from synthcxr.train.config import OptimizerSection, ScheduleSection

log = get_logger(__name__)

OptimizerFactory = Callable[[list[dict[str, Any]], OptimizerSection], Any]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    def deco(fn: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = fn
        return fn

    return deco


def _all_cuda(groups: list[dict[str, Any]]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def _torch_adam(cls_name: str) -> OptimizerFactory:
    def factory(groups: list[dict[str, Any]], cfg: OptimizerSection):
        import torch

        cls = getattr(torch.optim, cls_name)
        fused = cfg.fused if cfg.fused is not None else _all_cuda(groups)
        kwargs: dict[str, Any] = {"lr": cfg.effective_lr, "betas": cfg.betas, "eps": cfg.eps,
                                  "weight_decay": cfg.weight_decay}
        # fused = one kernel for the whole update instead of several per parameter: the reference
        # training step is launch-bound on GPUs, so this matters there; on CPU foreach is the default.
        if fused:
            kwargs["fused"] = True
        return cls(groups, **{**kwargs, **cfg.options})

    return factory


register("adam")(_torch_adam("Adam"))
register("adamw")(_torch_adam("AdamW"))


@register("adamw8bit")
def _adamw8bit(groups: list[dict[str, Any]], cfg: OptimizerSection):
    try:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(groups, lr=cfg.effective_lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, **cfg.options)
    except Exception as exc:  # import errors, missing native library, unsupported device
        raise TrainingError(
            f"bitsandbytes AdamW8bit cannot run here: {type(exc).__name__}: {exc}",
            fix="install a bitsandbytes build for this device, or use --set optimizer.name=adamw",
        ) from exc
    return opt


@register("adafactor")
def _adafactor(groups: list[dict[str, Any]], cfg: OptimizerSection):
    from transformers.optimization import Adafactor

    kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay, "relative_step": cfg.relative_step,
                              "scale_parameter": cfg.relative_step, "warmup_init": False}
    if cfg.relative_step:
        for group in groups:  # Adafactor computes its own step size; a group lr would be an error
            group.pop("lr", None)
        kwargs["lr"] = None
    else:
        kwargs["lr"] = cfg.effective_lr
    return Adafactor(groups, **{**kwargs, **cfg.options})


@register("dadaptation")
def _dadaptation(groups: list[dict[str, Any]], cfg: OptimizerSection):
    import dadaptation

    return dadaptation.DAdaptAdam(groups, lr=cfg.effective_lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, decouple=True, **cfg.options)


@register("prodigy")
def _prodigy(groups: list[dict[str, Any]], cfg: OptimizerSection):
    import prodigyopt

    return prodigyopt.Prodigy(groups, lr=cfg.effective_lr, betas=cfg.betas, eps=cfg.eps,
                              weight_decay=cfg.weight_decay, **cfg.options)


def check_optimizer_config(cfg: OptimizerSection) -> list[str]:
    """Warnings for settings that run but are probably not what the user meant."""
    warnings = []
    if cfg.lr_free and cfg.lr is not None and cfg.lr != 1.0:
        warnings.append(
            f"optimizer {cfg.name} estimates the step size itself and expects lr=1.0 (got {cfg.lr:g}); "
            "lr only scales its estimate"
        )
    return warnings


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimizerSection):
    for message in check_optimizer_config(cfg):
        log.warning(message)
    try:
        return OPTIMIZERS[cfg.name](groups, cfg)
    except TypeError as exc:  # an unknown key in optimizer.options
        raise ConfigError(f"optimizer {cfg.name} rejected its options {cfg.options}: {exc}",
                          fix="remove or rename the key under optimizer.options") from exc


def build_lr_scheduler(optimizer: Any, opt_cfg: OptimizerSection, cfg: ScheduleSection, total_steps: int):
    """diffusers' schedules; Adafactor in relative-step mode brings its own."""
    if opt_cfg.name == "adafactor" and opt_cfg.relative_step:
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.name == "warmup" else cfg.name
    if name == "constant" and cfg.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps,
                         num_cycles=cfg.num_cycles, power=cfg.power)


def current_lr(optimizer: Any, lr_scheduler: Any) -> float:
    """The learning rate actually applied (for D-Adaptation/Prodigy: d * lr, their effective step)."""
    group = optimizer.param_groups[0]
    lr = group.get("lr")
    if lr is None:  # Adafactor relative step
        try:
            return float(lr_scheduler.get_lr()[0])
        except Exception:  # noqa: BLE001 - logging must not fail a run
            return float("nan")
    return float(lr) * float(group.get("d", 1.0))
