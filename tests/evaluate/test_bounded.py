"""Bounded-memory fidelity: blocked KID/PRDC give the in-memory numbers (intervals included), and a
20,000-image evaluation (decode -> features -> FID/KID/PRDC) stays within a stated memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from synthcxr.evaluate.bounded import BlockedPRDC, in_memory_bytes
from synthcxr.evaluate.fidelity import PRDCDistances, fidelity_metrics


def _sets(n_r: int = 600, n_f: int = 560, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_r, d)), rng.normal(size=(n_f, d)) * 1.1 + 0.2


def test_blocked_metrics_equal_in_memory_with_intervals():
    real, fake = _sets()
    want, _ = fidelity_metrics(real, fake, kid_subsets=20, kid_subset_size=100, ci_groups=10, seed=4)
    got, _ = fidelity_metrics(real, fake, kid_subsets=20, kid_subset_size=100, ci_groups=10, seed=4, memory_limit=0)
    for key in ("precision", "recall", "density", "coverage"):
        assert got[key]["value"] == want[key]["value"], key
        np.testing.assert_allclose(got[key]["ci"], want[key]["ci"], rtol=1e-12, err_msg=key)
    for key in ("mean", "std"):
        np.testing.assert_allclose(got["kid"][key], want["kid"][key], rtol=1e-10)
    np.testing.assert_allclose(got["kid"]["ci"], want["kid"]["ci"], rtol=1e-9)
    assert got["fid"] == want["fid"]


def test_blocked_prdc_short_neighbour_lists_and_other_subsets():
    """Rows whose stored neighbours are all left out, and subsets that are not jackknife replicates."""
    real, fake = _sets(200, 180)
    full = PRDCDistances(real, fake, 5)
    blocked = BlockedPRDC(real, fake, 5, groups=3, seed=1, block=37, extra=0)  # groups of ~67: lists run short
    from synthcxr.evaluate.bounded import jackknife_groups

    lab_r, lab_f = jackknife_groups(200, 180, 3, 1)
    for g in range(3):
        ir, jf = np.flatnonzero(lab_r != g), np.flatnonzero(lab_f != g)
        assert blocked.values(ir, None) == full.values(ir, None)
        assert blocked.values(None, jf) == full.values(None, jf)
    rng = np.random.default_rng(2)
    ir, jf = np.sort(rng.choice(200, 50, replace=False)), np.sort(rng.choice(180, 40, replace=False))
    assert blocked.values(ir, jf) == full.values(ir, jf)


N_REAL = N_FAKE = 10_000
RSS_BOUND_MB = 1500
"""Peak RSS of the 20k-image evaluation (torch imported: ~450 MB of it); the in-memory pairwise
matrices alone would take in_memory_bytes(10k, 10k) = 4.8 GB."""

_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from synthcxr.evaluate.features import ExtractorConfig, build_extractor, extract_features
    from synthcxr.evaluate.fidelity import fidelity_metrics

    root, n_real, n_fake = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    sets = {}
    for role, n, shift in (("real", n_real, 0), ("fake", n_fake, 20)):
        (root / role).mkdir()
        paths = []
        for i in range(n):
            base = rng.integers(0, 200, (1, 1), dtype=np.uint8) + shift
            pix = np.clip(base + rng.integers(0, 50, (32, 32)), 0, 255).astype(np.uint8)
            paths.append(root / role / f"{i:05d}.png")
            Image.fromarray(pix, "L").save(paths[-1], compress_level=0)
        sets[role] = paths
    t0 = time.perf_counter()
    extractor = build_extractor(ExtractorConfig(name="random", image_size=32, device="cpu"))
    feats = {role: extract_features(p, extractor, None, batch_size=256).features for role, p in sets.items()}
    t1 = time.perf_counter()
    res, _ = fidelity_metrics(feats["real"], feats["fake"], kid_subsets=5, kid_subset_size=1000, ci_groups=0)
    t2 = time.perf_counter()
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "features_s": t1 - t0, "fidelity_s": t2 - t1, "precision": res["precision"]["value"],
                      "fid": res["fid"]["value"], "n": [len(feats["real"]), len(feats["fake"])]}))
""")


@pytest.mark.slow
def test_twenty_thousand_images_in_bounded_memory(tmp_path):
    assert in_memory_bytes(N_REAL, N_FAKE) > 4 * 1024**3  # so the blocked path is the one measured
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path), str(N_REAL), str(N_FAKE)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == [N_REAL, N_FAKE]
    assert res["peak_rss_mb"] < RSS_BOUND_MB, res
    assert 0.0 <= res["precision"] <= 1.0 and res["fid"] > 0
    print(res)
