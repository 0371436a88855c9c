"""DINOv2 / RAD-DINO / CLIP extractors (random-init and local folders, offline) and CMMD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from synthcxr.errors import ModelError
from synthcxr.evaluate.features import ExtractorConfig, build_extractor
from synthcxr.evaluate.fidelity import cmmd, cmmd_metric


def _reference_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """The paper's formula written out with explicit loops in float64 (independent of the vectorised code):
    CMMD = 1000 * (1/m^2 sum_ij k(x_i, x_j) + 1/n^2 sum_ij k(y_i, y_j) - 2/(mn) sum_ij k(x_i, y_j)),
    k(a, b) = exp(-||a - b||^2 / (2 sigma^2))."""

    def k(a, b):
        return math.exp(-sum((float(u) - float(v)) ** 2 for u, v in zip(a, b, strict=True)) / (2 * sigma * sigma))

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m)) / (m * m)
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return 1000.0 * (kxx + kyy - 2 * kxy)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_cmmd_matches_the_reference_formula():
    rng = np.random.default_rng(3)
    real = _unit(rng.normal(size=(30, 12))).astype(np.float32)  # CLIP embeddings are unit vectors in float32
    fake = _unit(rng.normal(size=(25, 12)) + 0.4).astype(np.float32)
    ref = _reference_cmmd(real, fake)
    assert ref > 0
    assert cmmd(real, fake) == pytest.approx(ref, rel=1e-5)
    # not scale-free: a different sigma gives a different number (the test would notice a wrong sigma)
    assert abs(cmmd(real, fake, sigma=5.0) - ref) / ref > 1e-3


def test_cmmd_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = _unit(rng.normal(size=(40, 8)))
    assert cmmd(a, a) == pytest.approx(0.0, abs=1e-9)
    near, far = _unit(a + 0.1), _unit(a + rng.normal(size=(1, 8)) * 2)
    assert 0 < cmmd(a, near) < cmmd(a, far)
    res = cmmd_metric(a, far, ci_groups=10)
    assert res["ci"][0] <= res["value"] <= res["ci"][1] and res["sigma"] == 10.0 and res["scale"] == 1000.0


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def dino_small():
    return build_extractor(ExtractorConfig(name="dinov2:vits14", pretrained=False, device="cpu"))


def test_dinov2_random_init_only_when_asked_and_flagged(dino_small):
    ext = dino_small
    assert ext.pretrained is False and ext.weights_warning and ext.dim == 384
    assert "random" in ext.id
    feats = ext(_images(3, 28))  # DINOv2 interpolates its position embeddings: small inputs keep the test fast
    assert feats.shape == (3, 384) and np.isfinite(feats).all()


def test_dinov2_uses_dgm_eval_preprocessing(dino_small):
    """224 px and ImageNet mean/std by default: an image at the ImageNet mean maps to zeros."""
    import torch

    assert dino_small.input_size == 224
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255.0
    assert torch.allclose(dino_small._prepare(mean.expand(1, 3, 4, 4)), torch.zeros(1, 3, 4, 4), atol=1e-6)


@pytest.mark.parametrize("name", ["dinov2", "raddino", "clip"])
def test_missing_weights_is_a_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        build_extractor(ExtractorConfig(name=name, device="cpu"))
    assert "extractor.weights=DIR" in err.value.fix and "huggingface-cli download" in err.value.fix
    with pytest.raises(ModelError, match="config.json"):
        build_extractor(ExtractorConfig(name=name, weights=tmp_path, device="cpu"))


def test_local_folder_weights_are_trained_weights_with_their_own_normalisation(tmp_path):
    """A RAD-DINO folder (save_pretrained layout) loads offline, counts as trained, and its
    preprocessor_config.json mean/std are used."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=28)).save_pretrained(tmp_path / "rad")
    (tmp_path / "rad" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    ext = build_extractor(ExtractorConfig(name="raddino", weights=tmp_path / "rad", image_size=28, device="cpu"))
    assert ext.pretrained and ext.weights_warning is None and ext.dim == 32
    assert ext(_images(2, 28)).shape == (2, 32)
    gray = torch.full((1, 3, 2, 2), 127.5)
    assert torch.allclose(ext._prepare(gray), torch.zeros(1, 3, 2, 2), atol=1e-6)
    other = build_extractor(ExtractorConfig(name="raddino", weights=tmp_path / "rad", image_size=42, device="cpu"))
    assert other.id != ext.id  # input size is part of the cache key


def test_clip_embeddings_are_unit_vectors():
    ext = build_extractor(ExtractorConfig(name="clip:vitb32", pretrained=False, image_size=64, device="cpu"))
    feats = ext(_images(2, 64))
    assert feats.shape == (2, 512) and ext.pretrained is False
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_evaluate_reports_one_table_per_extractor_and_cmmd(image_sets, tmp_path):
    """`extractors` adds a fidelity table per feature space and `cmmd` a CLIP number, each naming its extractor."""
    from typer.testing import CliRunner

    from synthcxr.cli import app

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, [
        "evaluate", "--real", str(image_sets["real"]), "--fake", str(image_sets["fake"]), "--metrics", "fidelity,cmmd",
        "--extractor", "random", "--out", str(out), "--set", "fidelity.ci_groups=5",
        "--set", 'extractors=[{"name": "dinov2:vits14", "pretrained": false, "image_size": 28}]',
        "--set", 'cmmd.extractor={"name": "clip:vitb32", "pretrained": false, "image_size": 64}'])
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    (table,) = res["fidelity_by_extractor"]
    assert table["extractor"]["name"] == "dinov2:vits14" and table["feature_dim"] == 384 and table["fid"]["value"] > 0
    assert res["fidelity"]["feature_dim"] == 256  # the main (random CNN) table is still there
    assert res["cmmd"]["extractor"]["name"] == "clip:vitb32" and res["cmmd"]["value"] >= 0
    assert "FD (dinov2:vits14, random weights)" in result.output and "CMMD (clip:vitb32" in result.output
    assert sum("random, untrained weights" in w for w in res["warnings"]) == 3


def test_fd_on_any_features_matches_the_frechet_formula_of_dgm_eval():
    """dgm-eval's FD (mean/cov in float64, Tr sqrt(S1 S2)) written independently via the eigenvalues of S1 S2,
    on DINOv2-sized features with fewer images than dimensions (the rank-deficient case)."""
    from synthcxr.evaluate.fidelity import fid

    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 384)).astype(np.float32)
    b = (rng.normal(size=(250, 384)) * 1.1 + 0.2).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    trace_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    diff = a64.mean(0) - b64.mean(0)
    ref = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert fid(a, b, "svd") == pytest.approx(ref, rel=1e-5)
