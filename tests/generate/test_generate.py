"""`generate_images` and `synthcxr generate` on the tiny model: determinism, resume after a crash,
refusing to mix or overwrite, prompts from a CSV, every sampler, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthcxr.errors import ConfigError, ModelError, ProblemsError
from synthcxr.fileio import read_jsonl, sha256_file
from synthcxr.generate.sample import CONFIG_FILE, MANIFEST, GenerateConfig, generate_images
from synthcxr.generate.schedulers import SCHEDULERS
from synthcxr.models.families import FAMILIES


@pytest.fixture(autouse=True)
def _fixed_date(monkeypatch):
    """The provenance date is the only thing that may differ between two runs; pin it."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1780000000")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    from synthcxr.models.load import load_pipeline

    return load_pipeline(tiny_model_dir)


def cfg_for(model: Path, out: Path, **kw) -> GenerateConfig:
    base = dict(model=str(model), prompt="a chest x-ray of a 45 year old male", n=4, steps=2, batch_size=2, out=out)
    return GenerateConfig(**{**base, **kw})


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("0*.*"))}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_same_seed_gives_identical_files(tiny_model_dir, tiny_pipe, tmp_path):
    a = generate_images(cfg_for(tiny_model_dir, tmp_path / "a"), pipe=tiny_pipe)
    b = generate_images(cfg_for(tiny_model_dir, tmp_path / "b"), pipe=tiny_pipe)
    assert files(a) == files(b) and len(files(a)) == 4
    c = generate_images(cfg_for(tiny_model_dir, tmp_path / "c", seed=1), pipe=tiny_pipe)
    # image i uses seed + i: seed 1 reproduces images 1..3 of seed 0 as its images 0..2
    assert files(c)["00000.png"] != files(a)["00000.png"]
    x, y = pixels(c / "00000.png").astype(int), pixels(a / "00001.png").astype(int)
    assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01  # rounding only (another batch position)


def test_batch_size_does_not_change_the_images(tiny_model_dir, tiny_pipe, tmp_path):
    one = generate_images(cfg_for(tiny_model_dir, tmp_path / "bs1", batch_size=1), pipe=tiny_pipe)
    four = generate_images(cfg_for(tiny_model_dir, tmp_path / "bs4", batch_size=4), pipe=tiny_pipe)
    for name in files(one):
        x, y = pixels(one / name).astype(int), pixels(four / name).astype(int)
        # same noise per image; batched float kernels may round differently by ~1e-6, i.e. at most one
        # grey level in a handful of pixels
        assert np.abs(x - y).max() <= 1
        assert (x != y).mean() < 0.01


def test_resume_after_crash_finishes_without_touching_finished_images(tiny_model_dir, tiny_pipe, tmp_path):
    out = tmp_path / "out"
    cfg = cfg_for(tiny_model_dir, out, n=5, batch_size=2)
    seen: list[dict] = []

    def crash_after_three(row: dict) -> None:
        seen.append(row)
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        generate_images(cfg, pipe=tiny_pipe, on_image=crash_after_three)
    assert [r["file"] for r in read_jsonl(out / MANIFEST)] == ["00000.png", "00001.png", "00002.png"]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("0*.png")}
    assert sorted(before) == ["00000.png", "00001.png", "00002.png"]

    generate_images(cfg, pipe=tiny_pipe)
    rows = read_jsonl(out / MANIFEST)
    assert sorted(r["file"] for r in rows) == [f"{i:05d}.png" for i in range(5)]  # exactly n rows, each once
    for name, stamp in before.items():
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was rewritten"
    for row in rows:
        assert sha256_file(out / row["file"]) == row["sha256"]
    # the resumed folder is byte-identical to an uninterrupted run
    assert files(out) == files(generate_images(cfg_for(tiny_model_dir, tmp_path / "whole", n=5, batch_size=2),
                                               pipe=tiny_pipe))
    # a finished folder is left alone; asking for more images only adds the new ones
    generate_images(cfg, pipe=tiny_pipe)
    assert len(read_jsonl(out / MANIFEST)) == 5
    generate_images(cfg.model_copy(update={"n": 6}), pipe=tiny_pipe)
    assert len(read_jsonl(out / MANIFEST)) == 6
    assert all((out / n).stat().st_mtime_ns == s[1] for n, s in before.items())


def test_deleted_image_is_generated_again_and_listed_once(tiny_model_dir, tiny_pipe, tmp_path):
    out = generate_images(cfg_for(tiny_model_dir, tmp_path / "out"), pipe=tiny_pipe)
    original = (out / "00001.png").read_bytes()
    (out / "00001.png").unlink()
    generate_images(cfg_for(tiny_model_dir, out), pipe=tiny_pipe)
    assert (out / "00001.png").read_bytes() == original
    assert sorted(r["file"] for r in read_jsonl(out / MANIFEST)) == [f"{i:05d}.png" for i in range(4)]


def test_refuses_a_folder_from_other_settings(tiny_model_dir, tiny_pipe, tmp_path):
    out = generate_images(cfg_for(tiny_model_dir, tmp_path / "out"), pipe=tiny_pipe)
    snapshot = files(out)
    with pytest.raises(ConfigError) as err:
        generate_images(cfg_for(tiny_model_dir, out, steps=3), pipe=tiny_pipe)
    assert "different settings" in str(err.value) and "steps" in str(err.value) and "new output folder" in str(err.value)
    with pytest.raises(ConfigError, match="prompt"):
        generate_images(cfg_for(tiny_model_dir, out, prompt="another prompt"), pipe=tiny_pipe)
    assert files(out) == snapshot


def test_never_overwrites_files_it_did_not_write(tiny_model_dir, tiny_pipe, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "00000.png").write_bytes(b"a user's image")
    with pytest.raises(ConfigError, match="no manifest.jsonl"):
        generate_images(cfg_for(tiny_model_dir, out), pipe=tiny_pipe)
    assert (out / "00000.png").read_bytes() == b"a user's image"

    done = generate_images(cfg_for(tiny_model_dir, tmp_path / "done"), pipe=tiny_pipe)
    (done / "00002.png").write_bytes(b"edited")
    with pytest.raises(ConfigError, match="changed after it was generated"):
        generate_images(cfg_for(tiny_model_dir, done), pipe=tiny_pipe)
    assert (done / "00002.png").read_bytes() == b"edited"


def test_manifest_png_and_config_contents(tiny_model_dir, tiny_pipe, tmp_path):
    from synthcxr import __version__
    from synthcxr.generate.export import read_png_provenance

    cfg = cfg_for(tiny_model_dir, tmp_path / "out", negative_prompt="text, watermark", guidance=5.0)
    out = generate_images(cfg, pipe=tiny_pipe)
    rows = read_jsonl(out / MANIFEST)
    row = rows[0]
    for key in ("file", "prompt", "negative_prompt", "seed", "model", "scheduler", "steps", "guidance", "resolution", "sha256"):
        assert key in row, key
    assert row["model"] == str(Path(tiny_model_dir).resolve()) and row["resolution"] == 64 and row["guidance"] == 5.0
    assert [r["seed"] for r in rows] == [0, 1, 2, 3]
    image = Image.open(out / row["file"])
    assert image.mode == "L" and image.size == (64, 64)  # grayscale, the model's native size
    text = read_png_provenance(out / row["file"])
    assert text["synthetic"] == "true" and text["synthcxr_version"] == __version__
    assert text["prompt"] == cfg.prompt and text["negative_prompt"] == "text, watermark"
    assert (text["seed"], text["scheduler"], text["steps"], text["guidance"]) == ("0", "dpmsolver++", "2", "5")
    assert text["model"] == row["model"] and text["date"].startswith("2026-05-28")
    assert "SYNTHETIC" in text["Description"]
    saved = (out / CONFIG_FILE).read_text()
    assert "negative_prompt: text, watermark" in saved and "scheduler: dpmsolver++" in saved


def test_dicom_round_trip_secondary_capture(tiny_model_dir, tiny_pipe, tmp_path):
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    png = generate_images(cfg_for(tiny_model_dir, tmp_path / "png", n=2), pipe=tiny_pipe)
    dcm = generate_images(cfg_for(tiny_model_dir, tmp_path / "dcm", n=2, format="dicom"), pipe=tiny_pipe)
    rows = read_jsonl(dcm / MANIFEST)
    assert [r["file"] for r in rows] == ["00000.dcm", "00001.dcm"]
    datasets = [pydicom.dcmread(dcm / r["file"]) for r in rows]  # no force=True: a valid Part 10 file
    for i, ds in enumerate(datasets):
        assert np.array_equal(ds.pixel_array, pixels(png / f"{i:05d}.png"))
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == SecondaryCaptureImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel, ds.Rows, ds.Columns) == (8, 8, 1, 64, 64)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "NO" and ds.ConversionType == "SYN"
        assert str(ds.PatientName) == "SYNTHETIC^IMAGE" and ds.PatientID.startswith("SYN-")
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert "SYNTHETIC" in ds.ImageComments and row_model(rows) in ds.DerivationDescription
        assert ds.ContentDate == "20260528" and ds.ContentTime
    assert datasets[0].SOPInstanceUID != datasets[1].SOPInstanceUID
    assert datasets[0].SeriesInstanceUID == datasets[1].SeriesInstanceUID


def row_model(rows: list[dict]) -> str:
    return rows[0]["model"]


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines the reference DICOM validator (dicom3tools) reports as errors for one file."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian: apt-get install dicom3tools; scripts/install_test_tools.sh)")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_dicom_files_pass_the_reference_validator(tiny_model_dir, tiny_pipe, tmp_path):
    from synthcxr.generate.export import Provenance, dicom_bytes

    dcm = generate_images(cfg_for(tiny_model_dir, tmp_path / "dcm", n=1, format="dicom"), pipe=tiny_pipe)
    assert dciodvfy_errors(dcm / "00000.dcm") == []
    # long and non-ASCII provenance stays within each attribute's value representation
    prov = Provenance(model="/very/long/" + "model-folder/" * 120, prompt="radiografía de tórax, 45 años " * 40,
                      seed=2**31, scheduler="dpmsolver++", steps=50, guidance=7.5, negative_prompt="text " * 50)
    odd = tmp_path / "odd.dcm"
    odd.write_bytes(dicom_bytes(Image.new("L", (48, 40), 128), prov, series_key="k" * 300, instance_number=12))
    assert dciodvfy_errors(odd) == []


def test_prompts_from_a_csv_of_clinical_attributes(tiny_model_dir, tiny_pipe, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("sex,age,label,n\nmale,45,tuberculosis,2\nF,30,normal,1\n")
    out = generate_images(cfg_for(tiny_model_dir, tmp_path / "out", prompt=None, prompts_csv=csv, batch_size=3),
                          pipe=tiny_pipe)
    rows = read_jsonl(out / MANIFEST)
    assert [r["prompt"] for r in rows] == ["a chest x-ray of a 45 year old male, tuberculosis"] * 2 + [
        "a chest x-ray of a 30 year old female, normal"]
    assert [(r["label"], r["sex"], r["age"]) for r in rows] == [
        ("tuberculosis", "male", 45.0), ("tuberculosis", "male", 45.0), ("normal", "female", 30.0)]
    # without a count column every row gets n images; a finding column fills the condition
    csv.write_text("sex,age,finding\nfemale,60,cavity in the right upper lobe\n")
    out = generate_images(cfg_for(tiny_model_dir, tmp_path / "out2", prompt=None, prompts_csv=csv, n=2), pipe=tiny_pipe)
    rows = read_jsonl(out / MANIFEST)
    assert len(rows) == 2 and rows[0]["prompt"] == "a chest x-ray of a 60 year old female, cavity in the right upper lobe"


def test_prompts_csv_reports_every_bad_row(tiny_model_dir, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("sex,age,label\nmale,forty,normal\nunknown,30,normal\nfemale,30,normal\n")
    with pytest.raises(ProblemsError) as err:
        generate_images(cfg_for(tiny_model_dir, tmp_path / "out", prompt=None, prompts_csv=csv))
    text = str(err.value)
    assert "bad.csv:2" in text and "'forty' is not a number" in text
    assert "bad.csv:3" in text and "'unknown' is not male/female" in text
    csv.write_text("sex,agee\nmale,4\n")
    with pytest.raises(Exception, match="did you mean 'age'"):
        generate_images(cfg_for(tiny_model_dir, tmp_path / "out", prompt=None, prompts_csv=csv))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", FAMILIES["sd"].schedulers)  # flow samplers: tests/models/test_families.py
def test_every_scheduler_runs(tiny_model_dir, tiny_pipe, tmp_path, name):
    import diffusers

    out = generate_images(cfg_for(tiny_model_dir, tmp_path / name, n=1, scheduler=name, guidance=1.0), pipe=tiny_pipe)
    assert isinstance(tiny_pipe.scheduler, getattr(diffusers, SCHEDULERS[name].class_name))
    assert read_jsonl(out / MANIFEST)[0]["scheduler"] == name
    assert pixels(out / "00000.png").std() > 0


def test_dpmsolver_plus_plus_is_the_multistep_solver(tiny_model_dir, tiny_pipe, tmp_path):
    generate_images(cfg_for(tiny_model_dir, tmp_path / "o", n=1, scheduler="dpmsolver++"), pipe=tiny_pipe)
    assert tiny_pipe.scheduler.config.algorithm_type == "dpmsolver++"


def test_bad_inputs_have_clear_messages(tiny_model_dir, tmp_path):
    from synthcxr.config import load_config

    with pytest.raises(ModelError, match="model not found"):
        generate_images(cfg_for(tmp_path / "missing", tmp_path / "out"))
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        generate_images(cfg_for(tiny_model_dir, tmp_path / "out", dtype="fp16", device="cpu"))
    with pytest.raises(ConfigError, match="did you mean 'ddim'"):
        load_config(GenerateConfig, None, [f"model={tiny_model_dir}", "prompt=x", "scheduler=ddmi"])
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(GenerateConfig, None, [f"model={tiny_model_dir}", "prompt=x", "stepz=3"])
    with pytest.raises(ConfigError, match="give a prompt"):
        load_config(GenerateConfig, None, [f"model={tiny_model_dir}"])
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        generate_images(GenerateConfig(model=tiny_model_dir, prompt="x", out=tmp_path / "file"))  # a Path is fine


def test_cli_generate_dicom_with_config_and_set(tiny_model_dir, tmp_path, capsys):
    from synthcxr.cli import main

    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nsteps: 2\nn: 3\nbatch_size: 3\n")
    out = tmp_path / "cli"
    main(["generate", "--config", str(cfg), "--prompt", "a chest x-ray: frontal view", "--set", "seed=7",
          "--format", "dicom", "--out", str(out), "--n", "2"])
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    rows = read_jsonl(out / MANIFEST)
    assert [r["seed"] for r in rows] == [7, 8] and rows[0]["prompt"] == "a chest x-ray: frontal view"
    assert json.loads(json.dumps(rows))[0]["file"].endswith(".dcm")

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--scheduler", "eulr", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "did you mean 'euler'" in capsys.readouterr().err


def test_speed_options_keep_the_images(tiny_model_dir, tiny_pipe, tmp_path):
    """Fused QKV, channels-last and chunked VAE decoding (on by default on CUDA) change speed, not images."""
    from synthcxr.models.load import load_pipeline

    plain = generate_images(cfg_for(tiny_model_dir, tmp_path / "plain", n=2), pipe=tiny_pipe)
    fast_pipe = load_pipeline(tiny_model_dir)
    fast = generate_images(cfg_for(tiny_model_dir, tmp_path / "fast", n=2, fuse_qkv=True, channels_last=True,
                                   decode_batch_size=1, compile=False), pipe=fast_pipe)
    assert fast_pipe._synthcxr_speed == {"fuse_qkv", "channels_last"}
    assert "Fused" in type(next(iter(fast_pipe.unet.attn_processors.values()))).__name__
    for name in files(plain):
        x, y = pixels(plain / name).astype(int), pixels(fast / name).astype(int)
        assert np.abs(x - y).max() <= 2 and (x != y).mean() < 0.02


def test_cli_generate_from_a_run_without_prompt_uses_the_runs_prompt(tiny_model_dir, tmp_path):
    """`synthcxr generate --model RUN --n N` (issue example): a DreamBooth run is sampled with its instance prompt."""
    from synthcxr.cli import main
    from synthcxr.config import save_config
    from synthcxr.train.config import load_train_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_train_config(None, [f"model.path={tiny_model_dir}", "data.path=unused",
                                         "method.name=dreambooth"]), run / "config.yaml")
    (run / "synthcxr_model.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "pipeline": None, "lora": None}))
    out = tmp_path / "gen"
    main(["generate", "--model", str(run), "--n", "1", "--steps", "1", "--out", str(out)])
    rows = read_jsonl(out / MANIFEST)
    assert [r["prompt"] for r in rows] == ["a sks chest x-ray"]


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_second_writer_on_the_same_folder_fails_at_once_and_a_crash_frees_it(tiny_model_dir, tiny_pipe, tmp_path,
                                                                              capsys):
    import subprocess
    import sys
    import time

    from synthcxr.cli import main
    from synthcxr.generate.lock import LOCK_FILE, OutputBusyError

    out = tmp_path / "out"
    generate_images(cfg_for(tiny_model_dir, out, n=2), pipe=tiny_pipe)
    assert not (out / LOCK_FILE).exists()  # a finished run leaves only its outputs
    before = _snapshot(out)
    # another process holds the folder, as a running `synthcxr generate` does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from synthcxr.generate.lock import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        after_lock = _snapshot(out)
        started = time.monotonic()
        with pytest.raises(OutputBusyError, match="another `synthcxr generate` is writing") as err:
            generate_images(cfg_for(tiny_model_dir, out, n=4))  # no pipe: fails before loading the model
        assert time.monotonic() - started < 5
        assert err.value.file == out and str(out) in str(err.value) and "--out" in str(err.value)
        assert _snapshot(out) == after_lock and {*after_lock} == {*before, LOCK_FILE}
        with pytest.raises(SystemExit) as exit_info:  # the CLI prints the message, no traceback
            main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--steps", "2", "--out", str(out)])
        assert exit_info.value.code != 0
        printed = capsys.readouterr().err
        assert "is writing into this output folder" in printed and "Traceback" not in printed
        assert _snapshot(out) == after_lock
        # the holder crashes: the kernel drops its lock and the next run resumes the folder
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_FILE).exists()  # left by the crash; harmless
    rows = []
    generate_images(cfg_for(tiny_model_dir, out, n=4), pipe=tiny_pipe, on_image=rows.append)
    assert [r["index"] for r in rows] == [2, 3]
    now = _snapshot(out)
    assert all(now[name] == before[name] for name in ("00000.png", "00001.png"))  # finished images untouched
    assert not (out / LOCK_FILE).exists()


def test_vae_tiling_option_turns_on_the_tiled_decoder(tiny_model_dir, tmp_path):
    """vae_tiling (for 1024 px on a small GPU) switches diffusers' tiled VAE on; images still come out."""
    from synthcxr.models.load import load_pipeline

    pipe = load_pipeline(tiny_model_dir)
    out = generate_images(cfg_for(tiny_model_dir, tmp_path / "t", vae_tiling=True), pipe=pipe)
    assert pipe.vae.use_tiling and len(list(out.glob("*.png"))) == 4
