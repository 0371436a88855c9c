"""`synthcxr export-dataset`: the exported set loads with `datasets` / `webdataset` and yields the
same images and metadata; filters remove what they say and are recorded; nothing existing is touched."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from synthcxr.errors import ConfigError
from synthcxr.fileio import sha256_file
from synthcxr.release.export import ExportOptions, export_dataset

N = 7
DUPLICATE_OF = {5: 2}  # image 5 has image 2's pixels (different seed text in the PNG)


def _pixels(i: int) -> np.ndarray:
    return np.random.default_rng(DUPLICATE_OF.get(i, i)).integers(0, 256, (16, 16), dtype=np.uint8)


@pytest.fixture
def gen_dir(tmp_path) -> Path:
    """A generation folder as `synthcxr generate` leaves it: PNGs with provenance + manifest.jsonl."""
    out = tmp_path / "gen"
    out.mkdir()
    lines = []
    for i in range(N):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"seed {100 + i}")
        path = out / f"{i:05d}.png"
        Image.fromarray(_pixels(i), "L").save(path, pnginfo=info)
        lines.append({"file": path.name, "index": i, "prompt": f"chest x-ray {i}", "negative_prompt": "",
                      "seed": 100 + i, "model": "/models/tiny", "scheduler": "ddim", "steps": 2, "guidance": 1.0,
                      "resolution": 16, "dtype": "float32", "prediction_type": "epsilon",
                      "label": "tuberculosis" if i % 2 else "normal", "sex": "female" if i < 3 else "male",
                      "age": 30 + i, "sha256": sha256_file(path), "created": "2026-12-02T00:00:00"})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return out


def _expected(gen_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (gen_dir / "manifest.jsonl").read_text().splitlines()]
    return {r["seed"]: r for r in rows if r["index"] not in DUPLICATE_OF}


def _check_records(records: list[tuple[np.ndarray, dict]], gen_dir: Path, passed: list[str]) -> None:
    want = _expected(gen_dir)
    assert sorted(m["seed"] for _, m in records) == sorted(want)
    for pixels, meta in records:
        row = want[meta["seed"]]
        np.testing.assert_array_equal(pixels, _pixels(row["index"]))
        for key in ("prompt", "label", "sex", "age", "model", "index", "sha256"):
            assert meta[key] == row[key], key
        assert meta["run"] is None
        assert list(meta["filters_passed"]) == passed


def _check_sums(out: Path) -> None:
    result = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert listed == on_disk


def test_imagefolder_loads_with_datasets(gen_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "release"
    summary = export_dataset(gen_dir, out, ExportOptions(format="imagefolder", shard_size=4))
    assert summary["images_in"] == N and summary["images_out"] == N - 1 and summary["shards"] == 2
    assert summary["filters"][0]["name"] == "duplicates" and summary["filters"][0]["examples"] == ["00005.png"]
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    _check_records([(np.asarray(r["image"]), r) for r in ds], gen_dir, ["duplicates"])
    _check_sums(out)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "Synthetic — not for clinical use" in card
    assert "removed 1 image(s)" in card and "license_name: TO COMPLETE" in card
    assert not list(tmp_path.glob("*.partial"))


def test_parquet_loads_with_datasets(gen_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "release"
    export_dataset(gen_dir, out, ExportOptions(format="parquet", shard_size=3))
    files = sorted(str(p) for p in (out / "data").glob("*.parquet"))
    assert len(files) == 2
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    _check_records([(np.asarray(r["image"]), r) for r in ds], gen_dir, ["duplicates"])
    _check_sums(out)


def test_webdataset_loads_with_webdataset(gen_dir, tmp_path):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "release"
    export_dataset(gen_dir, out, ExportOptions(format="webdataset", shard_size=4, dedupe=False))
    tars = sorted(str(p) for p in (out / "data").glob("*.tar"))
    assert len(tars) == 2
    records = [(np.asarray(Image.open(io.BytesIO(s["png"]))), s["json"])
               for s in wds.WebDataset(tars, shardshuffle=False).decode()]
    want = _expected(gen_dir)
    assert len(records) == N  # no dedupe: the duplicate stays
    _check_records([r for r in records if r[1]["index"] not in DUPLICATE_OF], gen_dir, [])
    _check_sums(out)
    # the same input gives the same bytes (fixed tar mtimes)
    again = tmp_path / "again"
    export_dataset(gen_dir, again, ExportOptions(format="webdataset", shard_size=4, dedupe=False))
    assert [sha256_file(p) for p in sorted((again / "data").glob("*.tar"))] == [sha256_file(t) for t in tars]
    assert len(want) == N - 1


def _evaluation(tmp_path: Path, gen_dir: Path, flagged: list[int], n_flagged: int | None = None) -> Path:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({
        "fidelity": {"fid": {"value": 12.5}, "kid": {"value": 0.01}},
        "memorization": {"n_synthetic": N, "n_flagged": len(flagged) if n_flagged is None else n_flagged,
                         "flagged": [{"synthetic": str(gen_dir / f"{i:05d}.png"), "flagged": True} for i in flagged],
                         "not_flagged_means": "copy similarity <= 0.9"}}))
    return path


def test_memorization_and_conditioning_filters_recorded(gen_dir, tmp_path):
    scores = tmp_path / "scores.csv"
    # image 3 (tuberculosis) scored low, image 4 (normal) scored high: both disagree with their labels
    probs = {0: 0.1, 1: 0.9, 2: 0.2, 3: 0.3, 4: 0.8, 5: 0.1, 6: 0.4}
    scores.write_text("file,score\n" + "".join(f"{i:05d}.png,{p}\n" for i, p in probs.items()))
    out = tmp_path / "release"
    summary = export_dataset(gen_dir, out, ExportOptions(evaluation=_evaluation(tmp_path, gen_dir, [1]),
                                                         label_scores=scores, label_threshold=0.5))
    counts = {f["name"]: f["removed"] for f in summary["filters"]}
    assert counts == {"duplicates": 1, "memorization": 1, "conditioning": 2}
    kept = sorted(json.loads(x)["index"] for p in out.rglob("metadata.jsonl") for x in p.read_text().splitlines())
    assert kept == [0, 2, 6]
    card = (out / "README.md").read_text()
    assert "FID: 12.5" in card and "**memorization**: removed 1" in card and "**conditioning**: removed 2" in card


def test_truncated_memorization_list_is_refused(gen_dir, tmp_path):
    with pytest.raises(ConfigError, match="lists only 1"):
        export_dataset(gen_dir, tmp_path / "release",
                       ExportOptions(evaluation=_evaluation(tmp_path, gen_dir, [1], n_flagged=150)))
    assert not (tmp_path / "release").exists()


def test_existing_output_and_changed_image_are_refused(gen_dir, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        export_dataset(gen_dir, out)
    assert (out / "mine.txt").read_text() == "keep"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(gen_dir / "00003.png")
    with pytest.raises(ConfigError, match="00003.png changed"):
        export_dataset(gen_dir, tmp_path / "other")


def test_cli_export_dataset(gen_dir, tmp_path, capsys):
    from synthcxr.cli import main

    out = tmp_path / "release"
    main(["export-dataset", str(gen_dir), "--out", str(out), "--format", "parquet", "--shard-size", "10"])
    assert "6 of 7 images" in capsys.readouterr().out
    assert len(list((out / "data").glob("*.parquet"))) == 1
    with pytest.raises(SystemExit) as exc:
        main(["export-dataset", str(gen_dir), "--out", str(tmp_path / "x"), "--format", "parket"])
    assert exc.value.code != 0
    assert "did you mean 'parquet'" in capsys.readouterr().err


def test_conditioning_records_only_the_images_it_checked(gen_dir, tmp_path):
    rows = [json.loads(x) for x in (gen_dir / "manifest.jsonl").read_text().splitlines()]
    rows[6]["label"] = None  # no label: the classifier has nothing to agree with
    (gen_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = tmp_path / "scores.csv"
    scores.write_text("file,score\n" + "".join(f"{i:05d}.png,{0.9 if i % 2 else 0.1}\n" for i in range(6)))
    out = tmp_path / "release"
    summary = export_dataset(gen_dir, out, ExportOptions(format="imagefolder", label_scores=scores))
    assert {f["name"]: f["removed"] for f in summary["filters"]} == {"duplicates": 1, "conditioning": 0}
    meta = {json.loads(x)["index"]: json.loads(x) for p in out.rglob("metadata.jsonl") for x in p.read_text().splitlines()}
    assert sorted(meta) == [0, 1, 2, 3, 4, 6]
    assert meta[6]["filters_passed"] == ["duplicates"]
    assert meta[0]["filters_passed"] == ["duplicates", "conditioning"]
