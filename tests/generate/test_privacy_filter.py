"""`generate --privacy-filter`: a candidate that copies a training image is discarded and made again
with the next seed; the manifest says so; the set stays byte-identical across resumes and shards;
a bad evaluation JSON is refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from synthcxr.errors import ConfigError, SynthCXRError
from synthcxr.fileio import read_jsonl
from synthcxr.generate.manifest import MANIFEST, merge_shards
from synthcxr.generate.privacy_filter import RECORD, RETRY_STRIDE, retry_seed
from synthcxr.generate.sample import GenerateConfig, generate_images
from synthcxr.generate.shard import Shard

N = 3
COPIED = 1
"""The image whose plain (unfiltered) version is planted in the training set."""


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from synthcxr.models.load import load_pipeline

    return load_pipeline(tiny_model_dir)


def cfg_for(model: Path, out: Path, privacy: dict | None = None, **kw) -> GenerateConfig:
    base = dict(model=str(model), prompt="a chest x-ray", n=N, steps=2, batch_size=2, out=out)
    return GenerateConfig(**{**base, **kw, **({"privacy": privacy} if privacy else {})})


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("0*.png"))}


def rows(out: Path) -> dict[str, dict]:
    return {r["file"]: r for r in read_jsonl(out / MANIFEST)}


@pytest.fixture(scope="module")
def world(tiny_model_dir, pipe, tmp_path_factory):
    """A plain generation, a training set holding a copy of its image 1 (plus 12 fixture X-rays, so the
    thresholds are calibrated leave-one-out), and the filtered generation of the same settings."""
    from synthcxr.data.fixtures import make_fixture_dataset

    env = pytest.MonkeyPatch()  # module fixtures run outside the autouse one
    env.setenv("SOURCE_DATE_EPOCH", "1780000000")
    root = tmp_path_factory.mktemp("privacy")
    env.setenv("SYNTHCXR_CACHE_DIR", str(root / "cache"))  # the feature cache, never the user's
    plain = generate_images(cfg_for(tiny_model_dir, root / "plain"), pipe=pipe)
    train = root / "train"
    train.mkdir()
    fixture = make_fixture_dataset(root / "fixture", "shenzhen", n=12, size=64, seed=3)
    for i, path in enumerate(sorted(fixture.rglob("*.png"))):
        shutil.copy(path, train / f"real_{i:02d}.png")
    shutil.copy(plain / f"{COPIED:05d}.png", train / "copied.png")
    privacy = {"filter": "auto", "train": str(train), "extractor": {"name": "random"}, "device": "cpu"}
    filtered = generate_images(cfg_for(tiny_model_dir, root / "filtered", privacy), pipe=pipe)
    yield {"root": root, "plain": plain, "train": train, "privacy": privacy, "filtered": filtered}
    env.undo()


def test_a_copy_of_a_training_image_is_discarded_and_made_with_the_next_seed(world):
    plain, filtered = world["plain"], world["filtered"]
    manifest = rows(filtered)
    copied = manifest[f"{COPIED:05d}.png"]
    assert copied["seed"] == COPIED  # the image's own seed (seed + i), as in plain generate
    assert copied["seeds_tried"] == [COPIED, COPIED + RETRY_STRIDE] and copied["seed_used"] == COPIED + RETRY_STRIDE
    first, second = copied["privacy"]["tries"]
    assert first["decision"] == "rejected" and first["copy_similarity"] > 0.999
    assert second["decision"] == "kept" and second["copy_similarity"] < 0.9
    assert copied["privacy"]["discarded"] == 1
    assert files(filtered)[f"{COPIED:05d}.png"] != files(plain)[f"{COPIED:05d}.png"]
    # the kept file says which seed made it
    from PIL import Image

    assert Image.open(filtered / f"{COPIED:05d}.png").text["seed"] == str(COPIED + RETRY_STRIDE)
    # every other image passed at once and is byte for byte the plain generation's
    for name, row in manifest.items():
        if name != f"{COPIED:05d}.png":
            assert row["seeds_tried"] == [row["seed"]] and row["privacy"]["decision"] == "kept"
            assert files(filtered)[name] == files(plain)[name]
    # thresholds were calibrated (leave-one-out on 13 training images) and recorded beside the images
    record = json.loads((filtered / RECORD).read_text())
    assert record["mode"] == "auto" and record["calibration"]["null"] == "leave-one-out"
    assert 0.2 < record["thresholds"]["copy_similarity"]["threshold"] < 0.999
    assert len({r["privacy_filter"] for r in manifest.values()}) == 1


def test_retry_seeds_stay_in_torchs_seed_range_and_never_meet_a_first_try():
    assert retry_seed(7, 0) == 7 and retry_seed(7, 1) == 7 + RETRY_STRIDE
    assert retry_seed(2**32 - 1, 1) == RETRY_STRIDE - 1  # wrapped: torch keeps only the low 32 bits
    seeds = {retry_seed(i, k) for i in range(50) for k in range(256)}
    assert len(seeds) == 50 * 256


@pytest.mark.slow
def test_resume_and_shards_give_the_same_files(world, tiny_model_dir, pipe, tmp_path):
    expected, expected_rows = files(world["filtered"]), rows(world["filtered"])
    # killed after the first image: the rejected image's retry is made on the rerun, identically
    out = tmp_path / "resumed"
    cfg = cfg_for(tiny_model_dir, out, world["privacy"])

    def crash(row: dict) -> None:
        raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        generate_images(cfg, pipe=pipe, on_image=crash)
    assert list(files(out)) == ["00000.png"]
    generate_images(cfg, pipe=pipe)
    assert files(out) == expected
    assert rows(out) == expected_rows
    # two cluster shards (each makes every other batch), then merged
    sharded = tmp_path / "sharded"
    for rank in (1, 0):
        generate_images(cfg_for(tiny_model_dir, sharded, world["privacy"]), pipe=pipe, shard=Shard(rank, 2))
    merge_shards(sharded)
    assert files(sharded) == expected and rows(sharded) == expected_rows


@pytest.mark.slow
def test_retry_cap_leaves_the_image_out_with_a_clear_error_and_a_rerun_finishes_it(world, tiny_model_dir, pipe,
                                                                                    tmp_path):
    out = tmp_path / "capped"
    with pytest.raises(SynthCXRError) as err:
        generate_images(cfg_for(tiny_model_dir, out, {**world["privacy"], "max_tries": 1}), pipe=pipe)
    assert "1 image(s) had no acceptable candidate in 1 tries (index 1)" in err.value.message
    assert "privacy.max_tries" in err.value.fix
    assert sorted(files(out)) == ["00000.png", "00002.png"]  # the others are finished
    made: list[str] = []
    generate_images(cfg_for(tiny_model_dir, out, {**world["privacy"], "max_tries": 3}), pipe=pipe,
                    on_image=lambda row: made.append(row["file"]))
    assert made == ["00001.png"] and files(out) == files(world["filtered"])


def test_a_folder_made_without_the_filter_is_not_continued_with_it(world, tiny_model_dir, pipe, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(world["plain"], out)
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in list(rows(out).values())[:2]))
    for name in ("00002.png",):
        (out / name).unlink()
    with pytest.raises(ConfigError, match="privacy_filter"):
        generate_images(cfg_for(tiny_model_dir, out, world["privacy"]), pipe=pipe)


# --------------------------------------------------------------------------- from an evaluation JSON
@pytest.fixture(scope="module")
def evaluation(world):
    from synthcxr.evaluate.run import EvaluateConfig, evaluate

    out = world["root"] / "eval.json"
    evaluate(EvaluateConfig(real=world["train"], train=world["train"], fake=world["plain"], out=out,
                            metrics=["memorization"], extractor={"name": "random", "device": "cpu"},
                            memorization={"top_pairs": 0}, cache_dir=world["root"] / "cache"))
    return out


@pytest.mark.slow
def test_cli_filter_from_an_evaluation_json(world, evaluation, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from synthcxr.cli import app

    evaluated = json.loads(evaluation.read_text())["memorization"]
    assert evaluated["n_flagged"] == 1  # the same rule flags the planted copy there ...
    out = tmp_path / "from_eval"
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), "--prompt", "a chest x-ray",
                                      "--n", str(N), "--steps", "2", "--batch-size", "2", "--out", str(out),
                                      "--privacy-filter", str(evaluation), "--set", "privacy.device=cpu"])
    assert result.exit_code == 0, result.output
    assert "privacy filter: 1 candidate image(s) discarded and regenerated with the next seed" in result.output
    record = json.loads((out / RECORD).read_text())  # ... and rejects it here
    assert record["mode"] == "eval.json" and record["thresholds"] == evaluated["thresholds"]
    assert rows(out)["00001.png"]["seeds_tried"] == [1, 1 + RETRY_STRIDE]


def _bad(evaluation: Path, tmp_path: Path, change) -> Path:
    data = json.loads(evaluation.read_text())
    change(data)
    path = tmp_path / "bad_eval.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case", ["no memorization", "no threshold", "other extractor asked", "not json"])
def test_a_bad_evaluation_json_is_refused_before_any_work(evaluation, tmp_path, case):
    def drop_threshold(d):
        del d["memorization"]["thresholds"]["copy_similarity"]["threshold"]

    changes = {"no memorization": lambda d: d.pop("memorization"), "no threshold": drop_threshold,
               "other extractor asked": lambda d: None, "not json": lambda d: None}
    path = _bad(evaluation, tmp_path, changes[case])
    if case == "not json":
        path.write_text("{not json")
    privacy = {"filter": str(path), **({"extractor": {"name": "timm:resnet18", "pretrained": False}}
                                       if case == "other extractor asked" else {})}
    # the model does not exist: reaching it would raise a ModelError, so a ConfigError proves nothing was loaded
    cfg = GenerateConfig(model=str(tmp_path / "no-model"), prompt="x", n=1, out=tmp_path / "out", privacy=privacy)
    with pytest.raises(ConfigError) as err:
        generate_images(cfg)
    assert err.value.file == path and err.value.fix
    expected = {"no memorization": "no memorization check", "no threshold": "copy_similarity.threshold is missing",
                "other extractor asked": "calibrated with another extractor", "not json": "not valid JSON"}[case]
    assert expected in err.value.message
    assert not (tmp_path / "out").exists()


def test_features_that_changed_since_the_evaluation_are_refused_before_the_model_is_loaded(evaluation, world, tmp_path):
    def other_seed(d):
        d["config"]["extractor"]["seed"] = 5  # another random network: other features than the thresholds were made with

    path = _bad(evaluation, tmp_path, other_seed)
    cfg = GenerateConfig(model=str(tmp_path / "no-model"), prompt="x", n=1, out=tmp_path / "out",
                         privacy={"filter": str(path), "device": "cpu"})
    with pytest.raises(ConfigError, match="other features now than when the evaluation was made") as err:
        generate_images(cfg)
    assert err.value.file == path and not list((tmp_path / "out").glob("*.png"))


def test_auto_without_training_images_says_how_to_give_them(tmp_path):
    cfg = GenerateConfig(model=str(tmp_path / "no-model"), prompt="x", n=1, out=tmp_path / "out",
                         privacy={"filter": "auto"})
    with pytest.raises(ConfigError, match="needs the model's training images") as err:
        generate_images(cfg)
    assert "privacy.train=DIR" in err.value.fix


# --------------------------------------------------------------------------- re-identification
@pytest.mark.slow
def test_reid_scores_are_recorded_and_reject_above_their_threshold(world, tiny_model_dir, pipe, tmp_path):
    import torch

    from synthcxr.privacy.reid import ReidModelConfig, _reid_net, save_reid

    torch.manual_seed(0)
    cfg = ReidModelConfig(backbone="tiny", image_size=32)
    weights = save_reid(tmp_path / "reid.pt", _reid_net(cfg), cfg, {"search_threshold": 0.999999, "candidates": 2,
                                                                     "rule": "test"})
    privacy = {**world["privacy"], "reid": {"weights": str(weights)}}
    out = generate_images(cfg_for(tiny_model_dir, tmp_path / "reid", privacy, n=1), pipe=pipe)
    (row,) = rows(out).values()
    score = row["privacy"]["tries"][0]["reid"]
    assert 0.0 < score < 0.999999 and row["privacy"]["decision"] == "kept"
    record = json.loads((out / RECORD).read_text())
    assert record["reid"]["threshold"] == 0.999999 and "re-ID score" in record["rule"]
    # a threshold below the score rejects every candidate
    with pytest.raises(SynthCXRError, match="no acceptable candidate in 2 tries"):
        generate_images(cfg_for(tiny_model_dir, tmp_path / "reid_strict",
                                {**privacy, "max_tries": 2, "reid": {"weights": str(weights), "threshold": score / 2}},
                                n=1), pipe=pipe)


def test_export_dataset_records_the_privacy_filter_and_the_seed_that_made_each_file(world, tmp_path):
    from synthcxr.release.export import ExportOptions, export_dataset

    export_dataset(world["filtered"], tmp_path / "release", ExportOptions(dedupe=False))
    meta = {m["file_name"]: m for m in read_jsonl(next((tmp_path / "release").rglob("metadata.jsonl")))}
    assert all(m["filters_passed"] == ["privacy_filter"] for m in meta.values())
    assert meta[f"{COPIED:05d}.png"]["seed"] == COPIED + RETRY_STRIDE and meta["00000.png"]["seed"] == 0
    export_dataset(world["plain"], tmp_path / "plain_release", ExportOptions(dedupe=False))
    plain = read_jsonl(next((tmp_path / "plain_release").rglob("metadata.jsonl")))
    assert all(m["filters_passed"] == [] for m in plain)
