"""Evaluate synthetic chest X-rays against real ones.

images.py (image sets, the one decode + resize) -> features.py (extractor registry, content-hash
cache) -> fidelity.py (FID/KID/PRDC + jackknife CIs), diversity.py (MS-SSIM), memorization.py
(nearest training image), utility.py (classifier AUC, conditioning fidelity) -> run.py
(`EvaluateConfig`, `evaluate(cfg) -> dict` + JSON) -> commands.py (`synthcxr evaluate`).
"""
