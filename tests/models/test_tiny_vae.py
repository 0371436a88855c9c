"""The tiny model's VAE fitted to chest X-rays: it learns to reconstruct, its latents are scaled to unit
variance, the fit is seeded, and `make-tiny --train-vae` checks the data before writing anything."""

from __future__ import annotations

import json
import math

import pytest
import torch

from synthcxr.cli import main
from synthcxr.models.tiny_vae import VaeFit, fit_vae, load_pixels


@pytest.fixture(scope="module")
def xrays(tmp_path_factory):
    from synthcxr.data.fixtures import make_fixture_dataset

    return make_fixture_dataset(tmp_path_factory.mktemp("vae_data"), "shenzhen", n=8, size=32)


def _tiny_vae():
    from synthcxr.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(sample_size=32).vae


def test_fit_learns_to_reconstruct_and_scales_latents_to_unit_variance(xrays):
    pixels = load_pixels(xrays, 32)
    assert pixels.shape == (8, 3, 32, 32)
    vae = _tiny_vae()
    record = fit_vae(vae, pixels, VaeFit(steps=60, seed=0))
    assert record["l1_after"] < 0.5 * record["l1_before"]
    # the scaling factor makes the latents the training loop draws unit-variance (second moment 1)
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    assert float((z * vae.config.scaling_factor).pow(2).mean().sqrt()) == pytest.approx(1.0, abs=0.1)
    assert record["scaling_factor"] == vae.config.scaling_factor != 0.18215
    assert not any(p.requires_grad for p in vae.parameters())


def test_fit_is_seeded_and_leaves_the_global_rng_alone(xrays):
    pixels = load_pixels(xrays, 32)
    a, b, c = _tiny_vae(), _tiny_vae(), _tiny_vae()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    fit_vae(a, pixels, VaeFit(steps=5, seed=0))
    assert torch.equal(torch.rand(3), expected_next)
    fit_vae(b, pixels, VaeFit(steps=5, seed=0))
    fit_vae(c, pixels, VaeFit(steps=5, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_make_tiny_train_vae_writes_a_loadable_model_that_records_the_fit(xrays, tmp_path, capsys):
    from synthcxr.models.load import load_pipeline

    out = tmp_path / "tiny"
    main(["model", "make-tiny", str(out), "--resolution", "32", "--train-vae", str(xrays), "--vae-steps", "20"])
    assert str(out) in capsys.readouterr().out
    info = json.loads((out / "synthcxr_tiny.json").read_text())
    assert info["vae"]["data"] == str(xrays.resolve()) and info["vae"]["steps"] == 20 and info["vae"]["images"] == 8
    pipe = load_pipeline(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(info["vae"]["scaling_factor"])


def test_make_tiny_train_vae_with_missing_data_writes_nothing(tmp_path, capsys):
    out = tmp_path / "tiny"
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "make-tiny", str(out), "--train-vae", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "nope" in err and "Fix:" in err
    assert not out.exists()


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 19])
def test_short_fits_run_whatever_the_step_count(xrays, steps):
    """`--vae-steps 10` (the demo test) once divided by zero in the warm-up schedule."""
    pixels = load_pixels(xrays, 32)
    record = fit_vae(_tiny_vae(), pixels, VaeFit(steps=steps, seed=0))
    assert math.isfinite(record["l1_after"])
