"""`synthcxr demo` end to end: the whole pipeline on the tiny model, then a resumed re-run.

Kept fast (a few VAE and training steps, random-init features); whether the default demo really
learns chest X-rays in five minutes is measured by benchmarks/demo.py (see BENCHMARKS.md)."""

from __future__ import annotations

import json
import time

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    from synthcxr.cli import main

    out = tmp_path / "demo"
    fast = ["--steps", "4", "--vae-steps", "10", "--random-features"]
    started = time.perf_counter()
    main(["demo", "--out", str(out), *fast])
    first = time.perf_counter() - started
    captured = capsys.readouterr()
    printed = captured.out.strip().splitlines()
    report = out / "grid" / "report.html"
    assert printed[-1] == str(report)  # the report's path is what the command prints
    html = report.read_text()
    for run in ("full-adamw",):
        assert run in html
        run_dir = out / "grid" / "runs" / run
        assert (run_dir / "train" / "DONE").is_file()
        assert (run_dir / "train" / "synthcxr_model.json").is_file()
        assert len((run_dir / "images" / "manifest.jsonl").read_text().splitlines()) == 8
        results = json.loads((run_dir / "eval.json").read_text())
        assert results["fidelity"]["fid"]["value"] >= 0
    # the base model, sampled with the same prompts and seeds, stands beside the runs with the KID change
    base_manifest = (out / "grid" / "runs" / "baseline" / "images" / "manifest.jsonl").read_text().splitlines()
    run_manifest = (out / "grid" / "runs" / "full-adamw" / "images" / "manifest.jsonl").read_text().splitlines()
    assert [(json.loads(a)["prompt"], json.loads(a)["seed"]) for a in base_manifest] == \
        [(json.loads(b)["prompt"], json.loads(b)["seed"]) for b in run_manifest]
    assert 'id="vs-baseline"' in html and "<b>full-adamw</b>: KID" in html
    assert "fine-tuned vs base model, full-adamw: KID" in captured.err
    tiny = json.loads((out / "model" / "synthcxr_tiny.json").read_text())
    assert tiny["vae"]["steps"] == 10 and tiny["vae"]["data"] == str((out / "data").resolve())
    assert tiny["denoiser"] == "demo" and tiny["prediction_type"] == "v_prediction"
    analysis = json.loads((out / "grid" / "study" / "analysis.json").read_text())
    assert {g["group"] for g in analysis["groups"]} == {"real", "baseline", "full-adamw"}
    assert 'alt="training loss curves"' in html and 'alt="sample"' in html and "realism" in html
    summary = (out / "grid" / "summary.csv").read_text()
    assert "full-adamw" in summary and "baseline" in summary

    # a second run reuses every finished step
    mtime = (out / "grid" / "runs" / "full-adamw" / "eval.json").stat().st_mtime
    started = time.perf_counter()
    main(["demo", "--out", str(out), *fast])
    second = time.perf_counter() - started
    status = json.loads((out / "grid" / "status.json").read_text())
    for name, run in status["runs"].items():
        train = "none" if name == "baseline" else "skipped"
        assert run["steps"] == {"train": train, "generate": "skipped", "evaluate": "skipped"}
    assert (out / "grid" / "runs" / "full-adamw" / "eval.json").stat().st_mtime == mtime
    assert second < first


def test_demo_base_model_is_built_to_learn_fast_and_sample_from_pure_noise():
    """The demo's denoiser predicts v (its target at high noise is the image), its schedule ends at (almost)
    zero signal for 32 x 32 latents, its sampler starts at the last training timestep (trailing spacing:
    a 10-step DDIM with SD's leading spacing starts at t=901, where the model expects signal that pure
    noise lacks), and cross-attention sits only at the lowest resolution (cheap on a CPU, sees the image)."""
    from synthcxr.generate.schedulers import make_scheduler
    from synthcxr.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(sample_size=64, denoiser="demo")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert float(pipe.scheduler.alphas_cumprod[-1]) < 1e-3
    sampler = make_scheduler("ddim", pipe.scheduler.config)
    sampler.set_timesteps(10)
    assert int(sampler.timesteps[0]) == pipe.scheduler.config.num_train_timesteps - 1
    assert pipe.unet.config.down_block_types[-1] == "CrossAttnDownBlock2D"
    assert "CrossAttnDownBlock2D" not in pipe.unet.config.down_block_types[:-1]
    # the test models everyone else builds stay as they were
    assert build_tiny_pipeline(sample_size=64).scheduler.config.prediction_type == "epsilon"


def test_demo_leaves_utility_out_when_the_data_is_too_small_to_test_a_classifier(tmp_path):
    """12 real images (6 per label) leave 1 + 1 in a 20% test split: utility failed every run (and so the
    study) on `--data`; the demo now measures it only with >= 10 images of each label."""
    from synthcxr.data.fixtures import make_fixture_dataset
    from synthcxr.demo import demo_metrics

    small, large = tmp_path / "small", tmp_path / "large"
    make_fixture_dataset(small, layout="shenzhen", n=6, size=32, seed=0)
    make_fixture_dataset(large, layout="shenzhen", n=30, size=32, seed=0)
    assert "utility" not in demo_metrics(small) and "fidelity" in demo_metrics(small)
    assert "utility" in demo_metrics(large)


def test_demo_refuses_a_folder_whose_model_was_fitted_to_other_data(tmp_path, capsys):
    import json as _json

    from synthcxr.cli import main

    model = tmp_path / "demo" / "model"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "synthcxr_tiny.json").write_text(_json.dumps({"vae": {"data": "/elsewhere"}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "/elsewhere" in err and "new --out" in err
    assert sorted(p.name for p in model.iterdir()) == ["model_index.json", "synthcxr_tiny.json"]
