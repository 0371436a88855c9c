"""FD-DINOv2 and CMMD as `evaluate` reports them, against the published reference formulas computed
independently on the same features, which here come from random-init DINOv2 and CLIP networks (no
weights offline): dgm-eval's Fréchet distance (mean and np.cov in float64, ||mu1 - mu2||^2 + Tr S1 +
Tr S2 - 2 Tr sqrt(S1 S2)) and google-research/cmmd's MMD (Gaussian kernel, sigma 10, x1000, all pairs)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from synthcxr.evaluate.feature_spaces import CMMDConfig, cmmd_check, extra_fidelity, set_features
from synthcxr.evaluate.features import ExtractorConfig
from synthcxr.evaluate.images import read_image_set


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref_sets")
    rng = np.random.default_rng(11)
    for role, n, shift in (("real", 14, 0.0), ("fake", 12, 40.0)):
        (root / role).mkdir()
        for i in range(n):
            img = np.clip(rng.normal(110 + shift, 50, (40, 40)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / role / f"{i:02d}.png")
    return {role: read_image_set(root / role, role) for role in ("real", "fake")}


def _dgm_eval_fd(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr sqrtm(S1 S2) through the eigenvalues of S1 S2 (real and >= 0: it is similar to a PSD matrix);
    # exact where scipy's sqrtm loses accuracy on the rank-deficient products of fewer images than dimensions
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def _cmmd_reference(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    gamma = 1.0 / (2 * sigma**2)

    def k(a, b):  # squared distances expanded as the reference does: ||a||^2 + ||b||^2 - 2 a.b
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-gamma * d2).mean()

    return scale * (k(x, x) + k(y, y) - 2 * k(x, y))


def test_fd_dinov2_of_evaluate_matches_dgm_eval_on_the_same_features(sets, tmp_path):
    dino = ExtractorConfig(name="dinov2:vits14", pretrained=False, image_size=28, device="cpu")
    (table,), _ = extra_fidelity([dino], sets, {"kid_subsets": 5, "kid_subset_size": 10, "k": 3, "ci_groups": 0},
                                 cache_dir=tmp_path, cache=False, on_error="fail")
    _, feats, _ = set_features(dino, sets, ["real", "fake"], cache_dir=tmp_path, cache=False, on_error="fail")
    assert feats["real"].shape == (14, 384) and table["extractor"]["name"] == "dinov2:vits14"
    ref = _dgm_eval_fd(feats["real"], feats["fake"])
    assert ref > 0 and table["fid"]["value"] == pytest.approx(ref, rel=1e-5)


def test_cmmd_of_evaluate_matches_the_reference_on_the_same_clip_embeddings(sets, tmp_path):
    cfg = CMMDConfig(extractor=ExtractorConfig(name="clip:vitb32", pretrained=False, image_size=64, device="cpu"),
                     ci_groups=0)
    result, _ = cmmd_check(cfg, sets, cache_dir=tmp_path, cache=False, on_error="fail")
    _, feats, _ = set_features(cfg.extractor, sets, ["real", "fake"], cache_dir=tmp_path, cache=False, on_error="fail")
    ref = _cmmd_reference(feats["real"], feats["fake"])
    assert result["sigma"] == 10.0 and result["scale"] == 1000.0
    assert ref > 0 and result["value"] == pytest.approx(ref, rel=1e-5)
