"""An extractor with random weights says so: in its description, once in the log, and in the results JSON."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from synthcxr.evaluate.features import ExtractorConfig, build_extractor
from synthcxr.evaluate.run import EvaluateConfig, evaluate


@pytest.mark.parametrize("cfg", [ExtractorConfig(name="random", device="cpu"),
                                 ExtractorConfig(name="torchvision:resnet18", pretrained=False, image_size=32, device="cpu")],
                         ids=["random", "torchvision-pretrained-false"])
def test_random_init_extractors_are_marked(cfg):
    ext = build_extractor(cfg)
    assert ext.pretrained is False and ext.describe()["pretrained"] is False
    assert "random, untrained weights" in ext.weights_warning and "not comparable" in ext.weights_warning


def test_a_weights_file_counts_as_trained(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    ext = build_extractor(ExtractorConfig(name="torchvision:resnet18", pretrained=False, weights=weights,
                                          image_size=32, device="cpu"))
    assert ext.pretrained is True and ext.weights_warning is None


def test_evaluate_warns_once_and_marks_the_json(image_sets, tmp_path, caplog):
    out = tmp_path / "eval.json"
    cfg = EvaluateConfig(real=image_sets["real"], fake=image_sets["fake"], out=out, metrics=["fidelity"],
                         extractor={"name": "random", "device": "cpu"}, fidelity={"ci_groups": 4, "kid_subsets": 2})
    with caplog.at_level(logging.WARNING, logger="synthcxr"):
        evaluate(cfg)
    saved = json.loads(out.read_text())
    assert saved["extractor_pretrained"] is False and saved["extractor"]["pretrained"] is False
    assert sum("random, untrained weights" in w for w in saved["warnings"]) == 1
    assert sum("random, untrained weights" in r.getMessage() for r in caplog.records) == 1
