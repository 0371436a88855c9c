"""Run an expanded grid: for every run train -> generate -> evaluate, then an optional reader study.

Layout of a grid folder (everything a run makes lives in its own folder):

```
OUT/grid.json                 the expanded plan (run names, axes, resolved configs)
OUT/status.json               last outcome of every run (the report and `--only` reruns read it)
OUT/summary.csv, summary.md   one row per run: metrics with CIs, losses, speed, memory, ratings
OUT/runs/NAME/train/          the training run directory (DONE marks it finished)
OUT/runs/NAME/images/         generated images + manifest.jsonl (generate.done.json marks it complete)
OUT/runs/NAME/eval.json       evaluation results
OUT/runs/NAME/run.log         everything logged while this run was processed
OUT/runs/NAME/error.txt, traceback.txt   only when the run failed
OUT/study/                    reader study (database, analysis) when the grid asks for one
```

Every step is skipped when its outputs are complete, so re-running the same command after a crash,
a kill or a failed run continues where it stopped; an unfinished training run resumes from its
last checkpoint. One failing run is recorded in its folder and the others go on.

The stage functions are passed in (`Stages`), so the same runner drives the real engines, a
subprocess per run (`accelerate launch`), a cluster job per run (submitit), or test fakes.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synthcxr.errors import ConfigError, SynthCXRError, TrainingError
from synthcxr.fileio import atomic_write_json, atomic_write_text, hash_strings, read_jsonl
from synthcxr.grid.expand import GridPlan, RunSpec
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)

LAUNCHERS = ("local", "accelerate", "slurm")
GENERATE_MARKER = "generate.done.json"


# ---------------------------------------------------------------------------------------------
# stage interface


@dataclass
class StudyRequest:
    """What the grid asks the study service for: one blinded study over the runs' images."""

    name: str
    out_dir: Path
    models: dict[str, Path]
    """Run name -> folder of generated images (with manifest.jsonl)."""
    real: Any
    """Real control images: a data path (or list of paths) as the data config accepts."""
    per_model: int
    real_count: int
    readers: int
    db: str | None
    simulate: bool
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stages:
    """The stage callables the runner drives; the defaults are the real engines.

    train(config: dict, out_dir, resume) -> run dir
    generate(settings: dict, model: str, out_dir) -> images dir
    evaluate(settings: dict, images_dir, out_json, train_config: dict | None) -> results dict
    study(StudyRequest) -> analysis dict
    """

    train: Callable[[dict[str, Any], Path, bool], Any]
    generate: Callable[[dict[str, Any], str, Path], Any]
    evaluate: Callable[[dict[str, Any], Path, Path, dict[str, Any] | None], Any]
    study: Callable[[StudyRequest], Any] | None = None
    split: Callable[[dict[str, Any], Path], Any] | None = None
    """split(base data config, path): save the grid's one patient-level split (None: each run splits alone)."""


def default_stages() -> Stages:
    from synthcxr.grid import stages

    return Stages(train=stages.train_stage, generate=stages.generate_stage,
                  evaluate=stages.evaluate_stage, study=stages.study_stage, split=stages.split_stage)


@dataclass
class AccelerateTrain:
    """Train one run as `accelerate launch [args] -m synthcxr train CONFIG --out DIR [--resume]`.

    A subprocess per run lets accelerate start one process per GPU (DDP/FSDP/DeepSpeed from the
    user's accelerate config); its output goes to the run's log.
    """

    args: list[str] = field(default_factory=list)
    accelerate: str | None = None

    def command(self, config_path: Path, out_dir: Path, resume: bool) -> list[str]:
        exe = self.accelerate or shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
        cmd = [exe, "launch", *self.args, "-m", "synthcxr", "train", str(config_path), "--out", str(out_dir)]
        return [*cmd, "--resume"] if resume else cmd

    def __call__(self, config: dict[str, Any], out_dir: Path, resume: bool) -> Path:
        out_dir = Path(out_dir)
        config_path = out_dir.parent / "train_config.yaml"
        atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
        cmd = self.command(config_path, out_dir, resume)
        log.info("launching: %s", " ".join(cmd))
        log_path = out_dir.parent / "accelerate.log"
        with open(log_path, "a", encoding="utf-8") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise TrainingError(f"accelerate launch exited with code {proc.returncode}; last lines:\n{tail}",
                                file=log_path, fix="read the log above; the run resumes when you run the grid again")
        return out_dir


# ---------------------------------------------------------------------------------------------
# one run


@dataclass
class RunResult:
    name: str
    status: str  # "done" | "failed"
    steps: dict[str, str] = field(default_factory=dict)
    """step -> "ran" | "skipped" | "failed"."""
    error: str | None = None
    run_dir: str = ""
    log: str = ""
    traceback: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def state(self) -> Path:
        return self.root / "run.json"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def error(self) -> Path:
        return self.root / "error.txt"

    @property
    def traceback(self) -> Path:
        return self.root / "traceback.txt"

    @property
    def generate_marker(self) -> Path:
        return self.root / GENERATE_MARKER

    @property
    def eval_settings(self) -> Path:
        """Hash of the evaluate settings that produced eval.json."""
        return self.root / "eval.settings"


def settings_hash(settings: dict[str, Any]) -> str:
    return hash_strings([json.dumps(settings, sort_keys=True, default=str)])[:12]


def _check_generate_settings(paths: RunPaths, generate: dict[str, Any]) -> None:
    """Images made with other generate settings are never mixed with new ones (or overwritten)."""
    try:
        old = json.loads(paths.generate_marker.read_text()).get("settings")
    except (OSError, json.JSONDecodeError):
        return
    if old and old != settings_hash(generate):
        raise ConfigError("the grid's generate settings changed since this run's images were made", file=paths.images,
                          fix="run the changed grid into a new --out folder (the images here are kept as they are)")


def _retire_stale_eval(paths: RunPaths, evaluate: dict[str, Any]) -> None:
    """Evaluate settings changed: keep the old results beside the new ones, then evaluate again."""
    if not paths.eval_json.exists() or not paths.eval_settings.exists():
        return
    old = paths.eval_settings.read_text().strip()
    if old != settings_hash(evaluate):
        keep = paths.eval_json.with_name(f"eval.{old}.json")
        paths.eval_json.replace(keep)
        log.info("evaluate settings changed: previous results kept as %s", keep)


def run_paths(out_dir: Path, name: str) -> RunPaths:
    return RunPaths(Path(out_dir) / "runs" / name)


def train_complete(paths: RunPaths) -> bool:
    return (paths.train / "DONE").exists()


def images_complete(paths: RunPaths) -> bool:
    """Complete when generation finished once and every image in the manifest is still there."""
    if not paths.generate_marker.exists():
        return False
    try:
        marker = json.loads(paths.generate_marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    rows = read_jsonl(paths.images / "manifest.jsonl")
    if len(rows) < int(marker.get("count", 0)):
        return False
    return all((paths.images / row["file"]).exists() for row in rows if "file" in row)


def eval_complete(paths: RunPaths) -> bool:
    try:
        return isinstance(json.loads(paths.eval_json.read_text()), dict)
    except (OSError, json.JSONDecodeError):
        return False


def _train_started(train_dir: Path) -> bool:
    """A started run has its resolved config saved; training then resumes from its last checkpoint."""
    return (train_dir / "config.yaml").is_file()


class _RunLog:
    """Copy everything synthcxr logs while one run is processed into that run's log file."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.logger = logging.getLogger("synthcxr")

    def __enter__(self) -> _RunLog:
        self.logger.addHandler(self.handler)
        if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
            self._old_level = self.logger.level
            self.logger.setLevel(logging.INFO)
        else:
            self._old_level = None
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
        if self._old_level is not None:
            self.logger.setLevel(self._old_level)


def _check_fingerprint(spec: RunSpec, paths: RunPaths) -> None:
    if not paths.state.exists():
        return
    try:
        old = json.loads(paths.state.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return
    if old and old != spec.fingerprint():
        raise ConfigError(
            f"run {spec.name!r} was started with a different config than the grid now gives it",
            file=paths.root,
            fix="run the changed grid into a new --out folder, or move this run's folder away to start it again",
        )


def run_one(spec: RunSpec, out_dir: str | Path, generate: dict[str, Any], evaluate: dict[str, Any],
            stages: Stages) -> RunResult:
    """Train (unless baseline) -> generate -> evaluate one run, skipping finished steps.

    Never raises for a failing stage: the error and traceback are written into the run's folder
    and returned, so the caller can go on with the other runs.
    """
    paths = run_paths(Path(out_dir), spec.name)
    paths.root.mkdir(parents=True, exist_ok=True)
    result = RunResult(name=spec.name, status="running", run_dir=str(paths.root), log=str(paths.log))
    started = time.time()
    step = "setup"
    owns_state = False  # a folder made for another config keeps its run.json untouched
    with _RunLog(paths.log):
        try:
            _check_fingerprint(spec, paths)
            owns_state = True
            atomic_write_json(paths.state, {"name": spec.name, "fingerprint": spec.fingerprint(),
                                            "status": "running", "started": started, **spec.to_dict()})
            # 1. train (the baseline samples the pre-trained model as it is)
            step = "train"
            if spec.is_baseline:
                model = str(spec.model)
                result.steps["train"] = "none"
            elif train_complete(paths):
                result.steps["train"] = "skipped"
                model = str(paths.train)
            else:
                resume = _train_started(paths.train)
                log.info("[%s] training%s", spec.name, " (resuming)" if resume else "")
                stages.train(spec.train, paths.train, resume)
                if not train_complete(paths):
                    raise TrainingError("training returned but the run has no DONE marker", file=paths.train,
                                        fix="check the run's log; run the grid again to resume")
                result.steps["train"] = "ran"
                model = str(paths.train)
            # 2. generate the shared prompts x seeds
            step = "generate"
            _check_generate_settings(paths, generate)
            if images_complete(paths):
                result.steps["generate"] = "skipped"
            else:
                log.info("[%s] generating images", spec.name)
                stages.generate(generate, model, paths.images)
                count = len(read_jsonl(paths.images / "manifest.jsonl"))
                if count == 0:
                    raise SynthCXRError("generation wrote no images (manifest.jsonl is empty or missing)",
                                        file=paths.images, fix="check the generate settings of the grid")
                atomic_write_json(paths.generate_marker, {"count": count, "model": model, "finished": time.time(),
                                                          "settings": settings_hash(generate)})
                result.steps["generate"] = "ran"
            # 3. evaluate against the real images
            step = "evaluate"
            _retire_stale_eval(paths, evaluate)
            if eval_complete(paths):
                result.steps["evaluate"] = "skipped"
            else:
                log.info("[%s] evaluating", spec.name)
                stages.evaluate(evaluate, paths.images, paths.eval_json, spec.train)
                if not eval_complete(paths):
                    raise SynthCXRError("evaluation returned but wrote no results", file=paths.eval_json,
                                        fix="check the evaluate settings of the grid")
                atomic_write_text(paths.eval_settings, settings_hash(evaluate) + "\n")
                result.steps["evaluate"] = "ran"
            result.status = "done"
            for stale in (paths.error, paths.traceback):
                stale.unlink(missing_ok=True)  # written by an earlier failed attempt of this grid
        except Exception as exc:  # noqa: BLE001 - one failing run must not stop the grid
            # SIGINT/SIGTERM during training (Ctrl-C, a cluster's preemption): the engine saved a
            # checkpoint; the grid stops too instead of starting the next run
            interrupted = any(cls.__name__ == "TrainingInterrupted" for cls in type(exc).__mro__)
            result.status = "interrupted" if interrupted else "failed"
            result.steps[step] = result.status
            message = exc.render() if isinstance(exc, SynthCXRError) else f"{type(exc).__name__}: {exc}"
            result.error = f"{step}: {message}"
            atomic_write_text(paths.error, result.error + "\n")
            atomic_write_text(paths.traceback, traceback.format_exc())
            result.traceback = str(paths.traceback)
            if interrupted:  # asked for (Ctrl-C, preemption): a stop to resume from, not an error
                log.warning("[%s] %s stopped: %s", spec.name, step, message)
            else:
                log.error("[%s] %s failed: %s (traceback: %s)", spec.name, step, message, paths.traceback)
    result.seconds = round(time.time() - started, 3)
    if owns_state:
        state = {"name": spec.name, "fingerprint": spec.fingerprint(), **spec.to_dict(), **asdict(result),
                 "finished": time.time()}
        atomic_write_json(paths.state, state)
    return result


# ---------------------------------------------------------------------------------------------
# the whole grid


@dataclass
class GridResult:
    out_dir: Path
    results: list[RunResult]
    study: dict[str, Any] | None = None
    study_error: str | None = None
    summary_csv: Path | None = None
    summary_md: Path | None = None

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.status != "done"]

    @property
    def ok(self) -> bool:
        return not self.failed and self.study_error is None

    @property
    def interrupted(self) -> bool:
        return any(r.status == "interrupted" for r in self.results)

    def describe(self) -> str:
        """A short human summary: which runs failed and where their logs are."""
        lines = [f"{len(self.results) - len(self.failed)} of {len(self.results)} run(s) finished in {self.out_dir}"]
        if self.interrupted:
            lines.append("  stopped by a signal after saving a checkpoint; run the same command again to resume")
        for r in self.failed:
            lines.append(f"  FAILED {r.name}: {(r.error or '').splitlines()[0] if r.error else 'unknown error'}")
            lines.append(f"         log: {r.log}" + (f"  traceback: {r.traceback}" if r.traceback else ""))
        if self.study_error:
            lines.append(f"  FAILED reader study: {self.study_error}")
        if self.summary_md:
            lines.append(f"summary: {self.summary_md}")
        return "\n".join(lines)


def _run_local(plan: GridPlan, runs: list[RunSpec], out_dir: Path, stages: Stages) -> list[RunResult]:
    results = []
    for i, spec in enumerate(runs, 1):
        log.info("run %d/%d: %s", i, len(runs), spec.name)
        results.append(run_one(spec, out_dir, plan.generate_for(spec), plan.evaluate, stages))
        if results[-1].status == "interrupted":
            log.warning("stopping the grid: %s was interrupted", spec.name)
            break
    return results


def _run_submitit(plan: GridPlan, runs: list[RunSpec], out_dir: Path, stages: Stages, executor: Any) -> list[RunResult]:
    """One job per run; waits for all of them. Job-level failures (killed, out of time) are recorded too."""
    if executor is None:
        try:
            import submitit
        except ImportError as exc:  # pragma: no cover - submitit is a dependency
            raise ConfigError("--launcher slurm needs the submitit package", fix="pip install submitit") from exc
        executor = submitit.AutoExecutor(folder=out_dir / "slurm" / "%j")
        params = {"timeout_min": 24 * 60, "name": f"synthcxr-{plan.name}", **plan.launcher.slurm}
        executor.update_parameters(**params)
    jobs = []
    for spec in runs:
        job = executor.submit(run_one, spec, out_dir, plan.generate_for(spec), plan.evaluate, stages)
        log.info("submitted %s as job %s", spec.name, getattr(job, "job_id", "?"))
        jobs.append((spec, job))
    results = []
    for spec, job in jobs:
        try:
            results.append(job.result())
        except Exception as exc:  # noqa: BLE001 - the job itself died; keep the others
            paths = run_paths(out_dir, spec.name)
            paths.root.mkdir(parents=True, exist_ok=True)
            stderr = getattr(getattr(job, "paths", None), "stderr", None)
            message = f"job {getattr(job, 'job_id', '?')} failed: {type(exc).__name__}: {exc}"
            atomic_write_text(paths.error, message + "\n")
            atomic_write_text(paths.traceback, traceback.format_exc())
            results.append(RunResult(name=spec.name, status="failed", error=message, run_dir=str(paths.root),
                                     log=str(stderr or paths.log), traceback=str(paths.traceback)))
    return results


def _study_request(plan: GridPlan, out_dir: Path, results: list[RunResult]) -> StudyRequest | None:
    assert plan.study is not None
    models = {r.name: run_paths(out_dir, r.name).images for r in results
              if r.status == "done" and images_complete(run_paths(out_dir, r.name))}
    if not models:
        return None
    real = plan.evaluate.get("real") or (plan.base.get("data") or {}).get("path")
    if plan.evaluate.get("split") and plan.evaluate.get("train") and real == plan.evaluate["train"]:
        real = _held_out_images(plan, Path(plan.evaluate["split"]), plan.study.real_count) or real
    return StudyRequest(name=plan.study.name or plan.name, out_dir=out_dir / "study", models=models, real=real,
                        per_model=plan.study.per_model, real_count=plan.study.real_count,
                        readers=plan.study.readers, db=plan.study.db, simulate=plan.study.simulate,
                        options=dict(plan.study.options))


def _held_out_images(plan: GridPlan, split_file: Path, needed: int) -> list[str] | None:
    """Real study controls from the shared split's held-out patients (test, then val), whom no
    generator saw: a reader is never shown a training image beside its memorised copy."""
    from synthcxr.data.config import DataConfig
    from synthcxr.data.dataset import load_records
    from synthcxr.data.splits import read_split, record_id

    assignment = read_split(split_file)
    records = load_records(DataConfig(**{k: v for k, v in (plan.base.get("data") or {}).items() if k != "split"}))
    for sides in (("test",), ("test", "val")):
        paths = [str(r.image_path) for r in records if r.image_path is not None and assignment.get(record_id(r)) in sides]
        if len(paths) >= needed:
            return paths
    log.warning("the split's held-out patients have fewer than %d images: the study's real controls come from %s",
                needed, plan.evaluate.get("real"))
    return None


def _run_study(plan: GridPlan, out_dir: Path, results: list[RunResult], stages: Stages,
               grid: GridResult) -> None:
    study_dir = out_dir / "study"
    analysis = study_dir / "analysis.json"
    if analysis.exists():
        log.info("reader study already analysed: %s", analysis)
        grid.study = json.loads(analysis.read_text())
        return
    request = _study_request(plan, out_dir, results)
    if request is None or stages.study is None:
        grid.study_error = "no finished run has images to put in a study" if request is None else None
        return
    study_dir.mkdir(parents=True, exist_ok=True)
    with _RunLog(study_dir / "study.log"):
        try:
            result = stages.study(request)
            if isinstance(result, dict):
                atomic_write_json(analysis, result)
                grid.study = result
        except Exception as exc:  # noqa: BLE001 - the runs' results stay valid without a study
            message = exc.render() if isinstance(exc, SynthCXRError) else f"{type(exc).__name__}: {exc}"
            atomic_write_text(study_dir / "error.txt", message + "\n")
            atomic_write_text(study_dir / "traceback.txt", traceback.format_exc())
            grid.study_error = f"{message} (log: {study_dir / 'study.log'})"
            log.error("reader study failed: %s", message)


def run_grid(
    plan: GridPlan,
    out_dir: str | Path,
    *,
    launcher: str = "local",
    stages: Stages | None = None,
    only: list[str] | None = None,
    executor: Any = None,
) -> GridResult:
    """Run (or resume) every selected run of the plan, then the study and the summary tables.

    `executor` is a submitit executor for `launcher="slurm"` (tests pass `submitit.LocalExecutor`).
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}", fix=f"use one of {', '.join(LAUNCHERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = stages or default_stages()
    share_split(plan, out_dir, stages)
    runs = plan.select(only)
    atomic_write_json(out_dir / "grid.json", plan.to_dict())

    if launcher == "accelerate":
        stages = Stages(train=AccelerateTrain(list(plan.launcher.accelerate_args)), generate=stages.generate,
                        evaluate=stages.evaluate, study=stages.study, split=stages.split)
    if launcher == "slurm":
        results = _run_submitit(plan, runs, out_dir, stages, executor)
    else:
        results = _run_local(plan, runs, out_dir, stages)

    grid = GridResult(out_dir=out_dir, results=results)
    _write_status(out_dir, plan, results)
    if plan.study is not None and not only and not grid.interrupted:
        _run_study(plan, out_dir, results, stages, grid)

    from synthcxr.grid.summary import write_summary

    grid.summary_csv, grid.summary_md = write_summary(out_dir)
    return grid


def share_split(plan: GridPlan, out_dir: Path, stages: Stages) -> Path | None:
    """Save one patient-level split of the base data set (`OUT/split.json`, or the base config's
    `data.split.file`) and make every run train on its train patients and every evaluation test the
    classifier on its test patients: the generators never see a patient the utility numbers are
    measured on. Changes the plan in place (the same on every call, so resuming is safe)."""
    data = plan.base.get("data") or {}
    if stages.split is None or not data.get("path"):
        return None
    path = Path((data.get("split") or {}).get("file") or Path(out_dir) / "split.json").resolve()
    if not path.exists():
        log.info("saving the grid's patient-level split to %s", path)
        stages.split(data, path)
    for spec in plan.runs:
        if spec.train is not None:
            spec.train.setdefault("data", {}).setdefault("split", {})["file"] = str(path)
    from synthcxr.data.splits import read_split

    if "test" not in read_split(path).values():
        log.warning("the grid's split %s holds out no test patients (data.split.test = 0): the utility classifiers "
                    "are tested on patients the generators trained on", path)
    elif not plan.evaluate.get("test") and not plan.evaluate.get("split"):
        plan.evaluate["split"] = str(path)
        from synthcxr.grid.expand import single_folder

        plan.evaluate.setdefault("train", single_folder(data.get("path")))
    return path


def _write_status(out_dir: Path, plan: GridPlan, results: list[RunResult]) -> None:
    """Merge this invocation's outcomes into status.json (an `--only` rerun keeps the others)."""
    path = out_dir / "status.json"
    try:
        status = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        status = {}
    runs = status.get("runs", {})
    runs.update({r.name: asdict(r) for r in results})
    order = [r.name for r in plan.runs]
    status = {"grid": plan.name, "updated": time.time(),
              "runs": {name: runs[name] for name in order if name in runs}}
    atomic_write_json(path, status)
