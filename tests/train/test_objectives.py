"""Our objectives equal an independent computation on the same draws (diffusers' training examples'
formulas written out here), to 1e-6 relative."""

from __future__ import annotations

import math

import pytest
import torch

from synthcxr.train.objectives import DDPMObjective, FlowMatchingObjective, per_sample_loss


def _model(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in denoiser that depends on both inputs."""
    return torch.tanh(noisy * 0.7 + 0.3) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def _reference_flow_loss(sched, u, x0, noise, weighting):
    """train_dreambooth_lora_sd3.py, step by step (get_sigmas by timestep lookup included)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[step_indices].flatten()
    while sigmas.ndim < x0.ndim:
        sigmas = sigmas.unsqueeze(-1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    pred = _model(noisy, timesteps)
    w = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=sigmas)
    target = noise - x0
    return torch.mean((w.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean(), timesteps


def _reference_u(sampling, n, seed, mean=0.0, std=1.0, mode_scale=1.29):
    g = torch.Generator().manual_seed(seed)
    if sampling == "logit_normal":
        return torch.sigmoid(torch.normal(mean, std, size=(n,), generator=g))
    u = torch.rand(size=(n,), generator=g)
    if sampling == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if sampling == "cosmap":
        return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
    return u


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode", "cosmap"])
def test_flow_matching_loss_equals_reference(sampling, weighting, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    obj = FlowMatchingObjective(sched, sampling=sampling, weighting=weighting, logit_mean=0.2, logit_std=0.8)
    u = obj.draw(6, torch.Generator().manual_seed(5), "cpu")
    torch.testing.assert_close(u, _reference_u(sampling, 6, 5, mean=0.2, std=0.8), rtol=0, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn((6, 4, 8, 8), generator=g), torch.randn((6, 4, 8, 8), generator=g)

    noised = obj.apply(x0, noise, u)
    ours = per_sample_loss(_model(noised.noisy, noised.timesteps), noised).mean()
    ref, ref_t = _reference_flow_loss(sched, u, x0, noise, weighting)
    assert torch.equal(noised.timesteps, ref_t)
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)


def test_flow_shift_moves_sigmas_up_and_fixed_draws_order_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    u = torch.tensor([0.25, 0.5, 0.75])
    plain = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=1.0)).sigmas_for(u)[0]
    shifted = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0)).sigmas_for(u)[0]
    assert bool((shifted > plain).all())
    # shift s maps sigma to s*sigma / (1 + (s-1)*sigma) (SD3 paper), on diffusers' discrete grid
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain), rtol=1e-5, atol=1e-6)
    obj = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0))
    sig = obj.sigmas_for(obj.fixed([100, 500, 900], "cpu"))[0]
    assert bool((sig[1:] > sig[:-1]).all()) and 0 < float(sig[0]) < 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_ddpm_loss_equals_reference(prediction_type, gamma):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    obj = DDPMObjective(sched, min_snr_gamma=gamma)
    t = obj.draw(6, torch.Generator().manual_seed(3), "cpu")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn((6, 4, 8, 8), generator=g), torch.randn((6, 4, 8, 8), generator=g)
    noised = obj.apply(x0, noise, t)
    ours = per_sample_loss(_model(noised.noisy, noised.timesteps), noised).mean()

    # written out from alphas_cumprod (train_text_to_image.py's formulas)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else noise
    mse = ((_model(noisy, t) - target) ** 2).mean(dim=[1, 2, 3])
    if gamma is not None:
        snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
        w = torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        mse = mse * w
    assert float(ours) == pytest.approx(float(mse.mean()), rel=1e-6)


def test_unknown_sampling_is_a_config_error():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from synthcxr.errors import ConfigError

    with pytest.raises(ConfigError, match="logit_normal"):
        FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(), sampling="lognormal")
