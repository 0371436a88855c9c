"""Optimizer and learning-rate schedule registries: a name in the config -> a small factory.

Each factory takes parameter groups (dicts with "params" and optionally "lr") and the optimizer
section; it never looks at the method, so every method works with every optimizer.

Each entry also names its typed extra options (`optimizer.options`): an `Options` subclass whose
fields are the keyword arguments the optimizer takes beyond lr/betas/eps/weight_decay, with their
bounds. The config validates `optimizer.options` against it when it is loaded (`validate_options`),
so an unknown key or a bad value fails before any work; an entry that names none takes no options.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from pydantic import Field, ValidationError

from synthcxr.config import StrictModel
from synthcxr.errors import ConfigError, TrainingError, did_you_mean
from synthcxr.logging_utils import get_logger
from synthcxr.train.config import OptimizerSection, ScheduleSection

log = get_logger(__name__)

OptimizerFactory = Callable[[list[dict[str, Any]], OptimizerSection], Any]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


class Options(StrictModel):
    """Typed extra keyword arguments of one optimizer; this base takes none. Leave defaults None
    (unset keys are not passed, so the library's own default applies) unless ours differs."""


OPTIONS: dict[str, type[Options]] = {}
"""name -> the Options subclass `optimizer.options` is checked against at config load."""

Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
"""A decay coefficient (beta): 0 <= x < 1."""


def register(name: str, options: type[Options] = Options) -> Callable[[OptimizerFactory], OptimizerFactory]:
    def deco(fn: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = fn
        OPTIONS[name] = options
        return fn

    return deco


def validate_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.options` checked against the entry's Options: the keys given, with typed values.

    Raises ValueError naming each bad key and its fix (the config loader turns it into a ConfigError).
    """
    spec = OPTIONS.get(name, Options)
    try:
        return spec.model_validate(options).model_dump(exclude_unset=True)
    except ValidationError as exc:
        allowed = list(spec.model_fields)
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] != "extra_forbidden":
                problems.append(f"options.{key}: {err['msg']} (got {err.get('input')!r})")
            elif key in OptimizerSection.model_fields:
                problems.append(f"{key!r} is not an option: set optimizer.{key} instead of optimizer.options.{key}")
            else:
                takes = f"it takes: {', '.join(allowed)}" if allowed else "it takes no options"
                problems.append(f"optimizer {name} has no option {key!r}{did_you_mean(key, allowed)}; {takes}")
        raise ValueError("; ".join(problems)) from None


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


class AdamWOptions(Options):
    amsgrad: bool | None = None
    maximize: bool | None = None
    foreach: bool | None = None
    capturable: bool | None = None
    differentiable: bool | None = None


class AdamOptions(AdamWOptions):
    decoupled_weight_decay: bool | None = None


register("adam", AdamOptions)(_torch_adam("Adam"))
register("adamw", AdamWOptions)(_torch_adam("AdamW"))


class AdamW8bitOptions(Options):
    min_8bit_size: int | None = Field(None, ge=0)
    """Parameters with fewer elements keep 32-bit states."""

    is_paged: bool | None = None


class AdafactorOptions(Options):
    eps: tuple[Positive, Positive] | None = None
    """Adafactor's own two epsilons (regularisation of the squared gradient, and of the parameter scale)."""

    clip_threshold: Positive | None = None
    decay_rate: float | None = Field(None, lt=0.0, allow_inf_nan=False)
    """Exponent of the second-moment decay (negative; -0.8 in the paper)."""

    beta1: Fraction | None = None
    scale_parameter: bool | None = None
    warmup_init: bool | None = None


class _StepSizeEstimatorOptions(Options):
    d0: Positive | None = None
    """Initial step-size estimate."""

    growth_rate: float | None = Field(None, gt=0.0)
    use_bias_correction: bool | None = None
    decouple: bool | None = None
    fsdp_in_use: bool | None = None


class DAdaptAdamOptions(_StepSizeEstimatorOptions):
    log_every: int | None = Field(None, ge=0)


class ProdigyOptions(_StepSizeEstimatorOptions):
    d_coef: Positive | None = None
    """Multiplies the estimated step size (below 1 for smaller steps)."""

    beta3: Fraction | None = None
    safeguard_warmup: bool | None = None
    slice_p: int | None = Field(None, ge=1)


@register("adamw8bit", AdamW8bitOptions)
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


@register("adafactor", AdafactorOptions)
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


@register("dadaptation", DAdaptAdamOptions)
def _dadaptation(groups: list[dict[str, Any]], cfg: OptimizerSection):
    import dadaptation

    return dadaptation.DAdaptAdam(groups, lr=cfg.effective_lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, **{"decouple": True, **cfg.options})


@register("prodigy", ProdigyOptions)
def _prodigy(groups: list[dict[str, Any]], cfg: OptimizerSection):
    import prodigyopt

    return prodigyopt.Prodigy(groups, lr=cfg.effective_lr, betas=cfg.betas, eps=cfg.eps,
                              weight_decay=cfg.weight_decay, **cfg.options)


# --------------------------------------------------------------------------- what 2026 fine-tuning tools add
# (OneTrainer, SimpleTuner, kohya): schedule-free AdamW and Prodigy, CAME, Lion (+ 8-bit), ADOPT, Muon.
# CAME, Lion, ADOPT and Muon come from one maintained collection (pytorch-optimizer); the two
# schedule-free ones from their authors' packages.

DEFAULT_LR: dict[str, float] = {
    "adam": 1e-4, "adamw": 1e-4, "adamw8bit": 1e-4, "adafactor": 1e-4, "dadaptation": 1.0, "prodigy": 1.0,
    "schedulefree_adamw": 1e-4, "prodigy_schedulefree": 1.0, "came": 1e-4, "adopt": 1e-4, "muon": 1e-4,
    # Lion's sign update is larger per element than Adam's: its authors use a 3-10x smaller lr
    "lion": 3e-5, "lion8bit": 3e-5,
}
"""optimizer.lr when it is unset (LoRA-scale steps; full fine-tunes want ~20x smaller, as for AdamW)."""


def _pytorch_optimizer(cls_name: str) -> Any:
    try:
        import pytorch_optimizer
    except ImportError as exc:
        raise TrainingError(f"optimizer {cls_name} needs the pytorch-optimizer package: {exc}",
                            fix="pip install -c constraints.txt pytorch-optimizer") from exc
    return getattr(pytorch_optimizer, cls_name)


class ScheduleFreeAdamWOptions(Options):
    warmup_steps: int | None = Field(None, ge=0)
    """Linear lr warmup inside the optimizer (schedule-free runs take no lr schedule; 0 by default)."""

    r: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    """Polynomial weighting power of the average (0 = uniform, the authors' default)."""

    weight_lr_power: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    """Weights each iterate by lr**power in the average (2.0 by default)."""

    foreach: bool | None = None


@register("schedulefree_adamw", ScheduleFreeAdamWOptions)
def _schedulefree_adamw(groups: list[dict[str, Any]], cfg: OptimizerSection):
    """Schedule-Free AdamW (Defazio et al. 2024): no lr schedule; trains at an interpolation of the
    iterate and its running average and is evaluated at the average (see `evaluation_weights`)."""
    import schedulefree

    return schedulefree.AdamWScheduleFree(groups, lr=cfg.effective_lr, betas=cfg.betas, eps=cfg.eps,
                                          weight_decay=cfg.weight_decay, **cfg.options)


class ProdigyScheduleFreeOptions(Options):
    d0: Positive | None = None
    """Initial step-size estimate (1e-6)."""

    d_coef: Positive | None = None
    """Multiplies the estimated step size (1.0; below 1 for smaller steps)."""

    beta3: Fraction | None = None
    prodigy_steps: int | None = Field(None, ge=0)
    """Stop adapting the step size after this many steps (0 = never)."""

    use_bias_correction: bool | None = None
    split_groups: bool | None = None
    """A separate step size per parameter group (UNet / text encoder)."""

    factored: bool | None = None
    """Adafactor-style factored second moments (less state memory; on by default)."""

    use_stableadamw: bool | None = None
    weight_decay_by_lr: bool | None = None
    schedulefree_c: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    use_speed: bool | None = None
    stochastic_rounding: bool | None = None
    """Stochastic rounding of bf16 weights (only matters for bf16 trainable weights)."""

    d_limiter: bool | None = None
    use_cautious: bool | None = None
    use_adopt: bool | None = None
    use_orthograd: bool | None = None


@register("prodigy_schedulefree", ProdigyScheduleFreeOptions)
def _prodigy_schedulefree(groups: list[dict[str, Any]], cfg: OptimizerSection):
    """Prodigy's step-size estimate on Schedule-Free AdamW (package prodigy-plus-schedule-free)."""
    from prodigyplus import ProdigyPlusScheduleFree

    # one group: the library would print that it turns split_groups off; say it ourselves instead
    options = {"split_groups": len(groups) > 1, **cfg.options}
    return ProdigyPlusScheduleFree(groups, lr=cfg.effective_lr, betas=cfg.betas, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay, **options)


class CAMEOptions(Options):
    beta3: Fraction | None = None
    """Decay of CAME's confidence (instability) statistic (0.9999)."""

    eps1: Positive | None = None
    """Regularises the factored squared gradient (1e-30)."""

    eps2: Positive | None = None
    """Regularises the instability matrix (1e-16)."""

    clip_threshold: Positive | None = None
    """Update RMS clipping (1.0)."""

    ams_bound: bool | None = None
    weight_decouple: bool | None = None
    """Decoupled (AdamW-style) weight decay (on)."""


@register("came", CAMEOptions)
def _came(groups: list[dict[str, Any]], cfg: OptimizerSection):
    """CAME (Luo et al. 2023): Adafactor's factored memory with a confidence-guided update."""
    options = dict(cfg.options)
    beta3 = options.pop("beta3", 0.9999)
    return _pytorch_optimizer("CAME")(groups, lr=cfg.effective_lr, betas=(*cfg.betas, beta3),
                                      weight_decay=cfg.weight_decay, **options)


class LionOptions(Options):
    weight_decouple: bool | None = None
    """Decoupled weight decay (on). Lion's authors use a 3-10x larger weight decay than AdamW's."""


@register("lion", LionOptions)
def _lion(groups: list[dict[str, Any]], cfg: OptimizerSection):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; one state tensor (half Adam's)."""
    return _pytorch_optimizer("Lion")(groups, lr=cfg.effective_lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                      **cfg.options)


class Lion8bitOptions(Options):
    min_8bit_size: int | None = Field(None, ge=0)
    """Parameters with fewer elements keep a 32-bit state."""

    is_paged: bool | None = None


@register("lion8bit", Lion8bitOptions)
def _lion8bit(groups: list[dict[str, Any]], cfg: OptimizerSection):
    """Lion with bitsandbytes' 8-bit block-wise quantized momentum."""
    try:
        import bitsandbytes as bnb

        return bnb.optim.Lion8bit(groups, lr=cfg.effective_lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  **cfg.options)
    except Exception as exc:  # import errors, missing native library, unsupported device
        if isinstance(exc, TypeError):
            raise
        raise TrainingError(f"bitsandbytes Lion8bit cannot run here: {type(exc).__name__}: {exc}",
                            fix="install a bitsandbytes build for this device, or use --set optimizer.name=lion"
                            ) from exc


class ADOPTOptions(Options):
    weight_decouple: bool | None = None
    """Decoupled (AdamW-style) weight decay; on here (the library's default is off) so weight_decay means
    what it means for adamw."""

    fixed_decay: bool | None = None


@register("adopt", ADOPTOptions)
def _adopt(groups: list[dict[str, Any]], cfg: OptimizerSection):
    """ADOPT (Taniguchi et al. 2024): Adam that normalises by the *previous* second moment, so it
    converges for any beta2 (clipped update, as the authors' default)."""
    options = {"weight_decouple": True, **cfg.options}
    return _pytorch_optimizer("ADOPT")(groups, lr=cfg.effective_lr, betas=cfg.betas, eps=cfg.eps,
                                       weight_decay=cfg.weight_decay, **options)


class MuonOptions(Options):
    momentum: Fraction | None = None
    """Momentum of the orthogonalised update (0.95)."""

    nesterov: bool | None = None
    ns_steps: int | None = Field(None, ge=1)
    """Newton-Schulz iterations (5)."""

    use_adjusted_lr: bool | None = None
    """Moonlight's shape scaling (0.2 * sqrt(max dim)): the update's RMS matches AdamW's, so AdamW's lr and
    weight decay carry over (on here: fine-tuning starts from AdamW settings)."""

    adamw_lr: Positive | None = None
    """Learning rate of the AdamW part (biases, norms, convolution kernels). None = optimizer.lr."""


@register("muon", MuonOptions)
def _muon(groups: list[dict[str, Any]], cfg: OptimizerSection):
    """Muon (Jordan et al. 2024) for the 2-D weight matrices, AdamW for everything else, as its authors
    prescribe: each group is split in two by parameter shape."""
    options = {"use_adjusted_lr": True, **cfg.options}
    adamw_lr = options.pop("adamw_lr", None)
    split: list[dict[str, Any]] = []
    n_matrices = 0
    for group in groups:
        matrices = [p for p in group["params"] if p.ndim == 2]
        others = [p for p in group["params"] if p.ndim != 2]
        n_matrices += len(matrices)
        lr = group.get("lr", cfg.effective_lr)
        if matrices:
            split.append({**group, "params": matrices, "use_muon": True, "lr": lr})
        if others:
            split.append({**group, "params": others, "use_muon": False, "lr": adamw_lr or lr,
                          "betas": cfg.betas, "eps": cfg.eps})
    if not n_matrices:
        shapes = sorted({tuple(p.shape) for g in groups for p in g["params"]}, key=len)[:3]
        raise ConfigError(f"optimizer muon found no 2-D weight matrix among the trainable parameters "
                          f"(shapes like {shapes}); Muon only updates matrices",
                          fix="train matrices (method lora, or target linear layers), or choose another optimizer")
    return _pytorch_optimizer("Muon")(split, lr=cfg.effective_lr, weight_decay=cfg.weight_decay, **options)


# --------------------------------------------------------------------------- schedule-free: train vs eval weights
def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def is_schedule_free(optimizer: Any) -> bool:
    """Schedule-free optimizers keep two weight sets: training steps at one, evaluation at another."""
    inner = _inner(optimizer)
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


def to_eval_weights(optimizer: Any) -> None:
    """Put the evaluation weights (the schedule-free average) into the parameters; no-op otherwise."""
    if is_schedule_free(optimizer):
        _inner(optimizer).eval()


@contextmanager
def evaluation_weights(optimizer: Any, params: list[Any]) -> Iterator[None]:
    """Parameters hold the evaluation weights inside the block, and afterwards exactly the training
    weights they held before (copied back: the eval/train switch is a float round trip, and an exact
    resume must not depend on how often validation ran)."""
    if not is_schedule_free(optimizer):
        yield
        return
    import torch

    saved = [p.detach().clone() for p in params]
    _inner(optimizer).eval()
    try:
        yield
    finally:
        _inner(optimizer).train()  # mode flags back to training
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def check_optimizer_config(cfg: OptimizerSection) -> list[str]:
    """Warnings for settings that run but are probably not what the user meant."""
    warnings = []
    if cfg.lr_free and cfg.lr is not None and cfg.lr != 1.0:
        warnings.append(
            f"optimizer {cfg.name} estimates the step size itself and expects lr=1.0 (got {cfg.lr:g}); "
            "lr only scales its estimate"
        )
    return warnings


def check_schedule(cfg: OptimizerSection, schedule: ScheduleSection) -> list[str]:
    """Warnings for a learning-rate schedule on a schedule-free optimizer (it replaces the schedule)."""
    if cfg.name in ("schedulefree_adamw", "prodigy_schedulefree") and (schedule.name != "constant"
                                                                       or schedule.warmup_steps):
        return [f"optimizer {cfg.name} is schedule-free: schedule {schedule.name} (warmup {schedule.warmup_steps}) "
                "multiplies its lr on top; use schedule.name=constant and, for warmup, "
                "optimizer.options.warmup_steps (schedulefree_adamw)"]
    return []


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimizerSection):
    for message in check_optimizer_config(cfg):
        log.warning(message)
    try:
        optimizer = OPTIMIZERS[cfg.name](groups, cfg)
        if is_schedule_free(optimizer):
            optimizer.train()  # schedule-free optimizers refuse to step in their initial eval mode
        return optimizer
    except TypeError as exc:  # an unknown key in optimizer.options
        raise ConfigError(f"optimizer {cfg.name} rejected its options {cfg.options}: {exc}",
                          fix="remove or rename the key under optimizer.options") from exc


def build_lr_scheduler(optimizer: Any, opt_cfg: OptimizerSection, cfg: ScheduleSection, total_steps: int):
    """diffusers' schedules; Adafactor in relative-step mode brings its own."""
    for message in check_schedule(opt_cfg, cfg):
        log.warning(message)
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
