"""Training objectives: how clean latents and noise become (noisy input, model timesteps, target, weights).

- `ddpm`: DDPM noise at integer timesteps; target epsilon or v (the scheduler's prediction type);
  optional min-SNR-gamma weights (Hang et al. 2023).
- `flow`: rectified flow matching (SD3, Sana, Flux): noisy = (1 - sigma) x0 + sigma eps, target
  eps - x0. sigma is drawn as diffusers' SD3/Flux training examples do: u from
  `uniform | logit_normal | mode | cosmap`, index = floor(u N) into the (shifted) sigmas of the
  model's FlowMatchEulerDiscreteScheduler; weights `none | sigma_sqrt | cosmap`
  (`compute_loss_weighting_for_sd3`).

Every random number comes from the caller's generator (`draw`), so a step's loss depends only on
(seed, step) and resumes are exact; `fixed` gives the draws of the held-out loss at fixed timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from synthcxr.errors import ConfigError

SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass
class Noised:
    noisy: Any
    timesteps: Any
    """What the denoiser is given as its timestep (DDPM: integer steps; flow: sigma x 1000)."""
    target: Any
    weights: Any = None
    """Per-row loss weights, or None for a plain mean."""


class DDPMObjective:
    """Epsilon / v-prediction with DDPM noise; the prediction type is the scheduler's."""

    name = "ddpm"

    def __init__(self, scheduler: Any, min_snr_gamma: float | None = None):
        self.scheduler = scheduler
        self.min_snr_gamma = min_snr_gamma
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self._snr: Any = None

    def draw(self, n: int, generator: Any, device: Any) -> Any:
        import torch

        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)

    def fixed(self, timesteps: list[int], device: Any) -> Any:
        import torch

        return torch.tensor(timesteps, device=device)

    def apply(self, x0: Any, noise: Any, draw: Any) -> Noised:
        sched = self.scheduler
        noisy = sched.add_noise(x0, noise, draw)
        v = sched.config.prediction_type == "v_prediction"
        target = sched.get_velocity(x0, noise, draw) if v else noise
        weights = self._snr_weights(draw, v) if self.min_snr_gamma is not None else None
        return Noised(noisy, draw, target, weights)

    def _snr_weights(self, timesteps: Any, v: bool) -> Any:
        """Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
        import torch
        from diffusers.training_utils import compute_snr

        if self._snr is None or self._snr.device != timesteps.device:  # table once per device: no copy per step
            self._snr = compute_snr(self.scheduler, torch.arange(self.num_train_timesteps, device=timesteps.device))
        snr = self._snr[timesteps]
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / (snr + 1) if v else clipped / snr


class FlowMatchingObjective:
    """Rectified flow matching on the sigmas of a FlowMatchEulerDiscreteScheduler (its shift included)."""

    name = "flow"

    def __init__(self, scheduler: Any, *, sampling: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, weighting: str = "none"):
        if sampling not in SAMPLINGS:
            raise ConfigError(f"unknown objective.sampling {sampling!r}", fix=f"use one of {', '.join(SAMPLINGS)}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown objective.weighting {weighting!r}", fix=f"use one of {', '.join(WEIGHTINGS)}")
        self.scheduler = scheduler
        self.sampling, self.weighting = sampling, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self._tables: dict[Any, tuple[Any, Any]] = {}

    def draw(self, n: int, generator: Any, device: Any) -> Any:
        """u in [0, 1] per row (diffusers' `compute_density_for_timestep_sampling`, plus cosmap)."""
        import torch
        from diffusers.training_utils import compute_density_for_timestep_sampling

        if self.sampling == "cosmap":  # SD3 paper eq. 21: t = 1 - 1 / (tan(pi u / 2) + 1)
            u = torch.rand((n,), generator=generator, device=device)
            return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
        scheme = "uniform" if self.sampling == "uniform" else self.sampling
        return compute_density_for_timestep_sampling(scheme, n, logit_mean=self.logit_mean, logit_std=self.logit_std,
                                                     mode_scale=self.mode_scale, device=device, generator=generator)

    def fixed(self, timesteps: list[int], device: Any) -> Any:
        """Held-out draws: timestep t (0..N-1) means the t-th smallest sigma, as in DDPM (small t, little noise)."""
        import torch

        n = self.num_train_timesteps
        return torch.tensor([(n - 1 - t + 0.5) / n for t in timesteps], device=device)

    def _table(self, device: Any) -> tuple[Any, Any]:
        if device not in self._tables:
            self._tables[device] = (self.scheduler.sigmas.to(device), self.scheduler.timesteps.to(device))
        return self._tables[device]

    def sigmas_for(self, draw: Any) -> tuple[Any, Any]:
        """(sigma, model timestep) per row: index floor(u N) into the scheduler's shifted tables."""
        sigmas, timesteps = self._table(draw.device)
        index = (draw * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)  # u = 1.0 possible
        return sigmas[index], timesteps[index]

    def apply(self, x0: Any, noise: Any, draw: Any) -> Noised:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigma, timesteps = self.sigmas_for(draw)
        s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        noisy = (1.0 - s) * x0 + s * noise
        weights = None
        if self.weighting != "none":
            weights = compute_loss_weighting_for_sd3(self.weighting, sigmas=sigma).float()
        return Noised(noisy, timesteps, noise - x0, weights)


def build_objective(kind: str, scheduler_config: Any, objective_cfg: Any, *, min_snr_gamma: float | None) -> Any:
    """The objective a family trains with, its scheduler built from the model's own scheduler config."""
    if kind == "ddpm":
        from diffusers import DDPMScheduler

        return DDPMObjective(DDPMScheduler.from_config(scheduler_config), min_snr_gamma=min_snr_gamma)
    if kind == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        if min_snr_gamma is not None:
            raise ConfigError("train.min_snr_gamma is defined for epsilon/v-prediction, not for flow matching",
                              fix="unset train.min_snr_gamma and choose objective.weighting (none, sigma_sqrt, cosmap)")
        extra = {"shift": objective_cfg.shift} if objective_cfg.shift is not None else {}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, **extra)
        return FlowMatchingObjective(scheduler, sampling=objective_cfg.sampling, logit_mean=objective_cfg.logit_mean,
                                     logit_std=objective_cfg.logit_std, mode_scale=objective_cfg.mode_scale,
                                     weighting=objective_cfg.weighting)
    raise ConfigError(f"unknown objective {kind!r}", fix="use ddpm or flow")


def per_sample_loss(pred: Any, noised: Noised) -> Any:
    """Weighted mean squared error per row (fp32)."""
    import torch.nn.functional as F

    loss = F.mse_loss(pred.float(), noised.target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return loss * noised.weights if noised.weights is not None else loss
