"""VAE tiling decides pixels (tiles above the VAE's tile size are decoded apart and blended), so it is an
output setting: a folder is continued only with the tiling it was generated with."""

from __future__ import annotations

import pytest

from synthcxr.errors import ConfigError
from synthcxr.fileio import read_jsonl
from synthcxr.generate.sample import MANIFEST, GenerateConfig, generate_images


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("0*.png"))}


def test_vae_tiling_is_an_output_setting_that_a_resume_must_keep(tiny_model_dir, tmp_path):
    from synthcxr.models.load import load_pipeline

    pipe = load_pipeline(tiny_model_dir)  # 64 px VAE tiles: 128 px images are decoded in 4 blended tiles

    def run(out, n=2, **kw):
        cfg = GenerateConfig(model=str(tiny_model_dir), prompt="a chest x-ray", n=n, steps=2, batch_size=2,
                             resolution=128, out=out, **kw)
        return generate_images(cfg, pipe=pipe)

    tiled = run(tmp_path / "tiled", vae_tiling=True)
    plain = run(tmp_path / "plain")  # the same pipeline: tiling is switched off again
    assert not pipe.vae.use_tiling
    assert _files(tiled).keys() == _files(plain).keys() and _files(tiled) != _files(plain)
    assert all(r["vae_tiling"] is True for r in read_jsonl(tiled / MANIFEST))
    assert all("vae_tiling" not in r for r in read_jsonl(plain / MANIFEST))  # as folders written before the key

    for out, tiling in ((tiled, False), (plain, True)):
        before = _files(out)
        with pytest.raises(ConfigError, match="vae_tiling"):
            run(out, n=3, vae_tiling=tiling)
        assert _files(out) == before  # nothing written
    rows = []
    generate_images(GenerateConfig(model=str(tiny_model_dir), prompt="a chest x-ray", n=3, steps=2, batch_size=2,
                                   resolution=128, out=tiled, vae_tiling=True), pipe=pipe, on_image=rows.append)
    assert [r["index"] for r in rows] == [2]  # the same tiling continues the folder
