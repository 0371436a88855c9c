"""Read what the stages left on disk into plain records for the summary table and the report.

Works on a grid folder (`OUT/grid.json` + `OUT/runs/NAME/`), on one grid run folder, or on a bare
training run directory. Every piece is optional: a run that never got evaluated simply has no
metrics, and the report says so instead of failing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synthcxr.errors import SynthCXRError
from synthcxr.fileio import read_jsonl
from synthcxr.models.load import RUN_MODEL_FILE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Metric:
    """One number with its optional confidence interval (or standard deviation)."""

    name: str
    value: float
    low: float | None = None
    high: float | None = None
    std: float | None = None

    def format(self, digits: int = 4) -> str:
        text = _fmt(self.value, digits)
        if self.low is not None and self.high is not None:
            return f"{text} [{_fmt(self.low, digits)}, {_fmt(self.high, digits)}]"
        if self.std is not None:
            return f"{text} ± {_fmt(self.std, digits)}"
        return text


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 1)}e}"


@dataclass
class RunData:
    """Everything known about one run, each part None/empty when it was not produced."""

    name: str
    root: Path
    axes: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    status: str | None = None
    error: str | None = None
    log: Path | None = None
    train_dir: Path | None = None
    config: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    train_summary: dict[str, Any] = field(default_factory=dict)
    images_dir: Path | None = None
    manifest: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    eval_path: Path | None = None

    # -- training ----------------------------------------------------------------------------
    def loss_curve(self) -> list[tuple[float, float]]:
        return _series(self.metrics, ("loss", "train_loss", "train/loss"))

    def val_loss_curve(self) -> list[tuple[float, float]]:
        return _series(self.metrics, ("val_loss", "validation_loss", "val/loss", "eval_loss"))

    def final_val_loss(self) -> float | None:
        curve = self.val_loss_curve()
        if curve:
            return curve[-1][1]
        return _first(self.train_summary, ("final_val_loss", "val_loss", "validation_loss"))

    def train_seconds(self) -> float | None:
        value = _first(self.train_summary, ("train_seconds", "train_time_s", "wall_time_s", "elapsed_s",
                                            "seconds", "duration_s", "time_s"))
        if value is None:  # unfinished run: wall time between its first and last logged step
            times = [r["time"] for r in self.metrics if isinstance(r.get("time"), int | float)]
            value = max(times) - min(times) if len(times) > 1 else None
        return value

    def images_per_second(self) -> float | None:
        return _first(self.train_summary, ("images_per_second", "images_per_s", "imgs_per_s", "throughput"))

    def peak_memory_mb(self) -> float | None:
        mb = _first(self.train_summary, ("peak_memory_mb", "peak_mem_mb", "max_memory_mb"))
        if mb is not None:
            return mb
        b = _first(self.train_summary, ("peak_memory_bytes", "peak_mem_bytes", "max_memory_bytes", "peak_memory"))
        if b is not None:
            return b / 2**20
        gb = _first(self.train_summary, ("peak_memory_gib", "peak_memory_gb", "peak_mem_gb"))
        return gb * 1024 if gb is not None else None

    def trainable_params(self) -> int | None:
        value = _first(self.train_summary, ("trainable_params", "trainable_parameters", "n_trainable", "num_trainable_params"))
        return int(value) if value is not None else None

    # -- evaluation --------------------------------------------------------------------------
    def metric_list(self) -> list[Metric]:
        return extract_metrics(self.eval) if self.eval else []

    def memorization_pairs(self, limit: int = 8) -> list[dict[str, Any]]:
        return extract_memorization(self.eval, self.eval_path, limit) if self.eval else []

    @property
    def method(self) -> str | None:
        return ((self.config or {}).get("method") or {}).get("name") if self.config else ("baseline" if self.baseline else None)

    @property
    def optimizer(self) -> str | None:
        return ((self.config or {}).get("optimizer") or {}).get("name") if self.config else None

    @property
    def family(self) -> str | None:
        """The model family training recorded (e.g. "Stable Diffusion XL"), or the config's model.family."""
        label = self.train_summary.get("family_label") or self.train_summary.get("family")
        return label or (((self.config or {}).get("model") or {}).get("family") if self.config else None)


@dataclass
class ReportData:
    title: str
    root: Path
    runs: list[RunData]
    plan: dict[str, Any] | None = None
    study: dict[str, Any] | None = None
    study_dir: Path | None = None
    real_images: list[Path] = field(default_factory=list)
    is_grid: bool = True


# ---------------------------------------------------------------------------------------------
# small readers


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = d.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _series(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[float, float]]:
    out = []
    for i, row in enumerate(rows):
        for key in keys:
            value = row.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out.append((float(row.get("step", i)), float(value)))
                break
    return out


def _metric_from(name: str, d: dict[str, Any]) -> Metric | None:
    """Recognise the usual shapes of "a number with uncertainty" in evaluation JSON."""
    value = _first(d, ("value", "mean", "estimate", "point", "auc"))
    if value is None:
        return None
    low = high = None
    for key in ("ci", "ci95", "ci_95", "confidence_interval", "interval"):
        ci = d.get(key)
        if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(c, int | float) for c in ci):
            low, high = float(ci[0]), float(ci[1])
            break
        if isinstance(ci, dict):
            low, high = _first(ci, ("low", "lower", "lo")), _first(ci, ("high", "upper", "hi"))
            break
    if low is None:
        low = _first(d, ("ci_low", "ci_lower", "low", "lower"))
        high = _first(d, ("ci_high", "ci_upper", "high", "upper"))
    return Metric(name, value, low, high, _first(d, ("std", "stdev", "sd")))


SKIP_SECTIONS = {"config", "settings", "meta", "metadata", "files", "pairs", "top_pairs", "flagged", "warnings",
                 "notes", "split", "paths", "environment", "histogram", "distribution", "per_image", "extractor",
                 "features", "timing", "cache"}
SKIP_NUMBERS = {"n", "count", "seed", "n_real", "n_fake", "n_train", "num_images", "k", "prdc_k", "subsets",
                "subset_size", "bootstrap", "n_bootstrap", "n_boot", "elapsed_s", "seconds", "feature_dim",
                "ci_level", "n_pairs", "scales", "kernel_size", "sigma", "threshold", "image_size", "resolution",
                "epochs", "batch_size", "size"}


CURATED: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    # (column name, JSON path in `synthcxr evaluate` results, value keys tried at that path)
    ("fid", ("fidelity", "fid"), ("value",)),
    ("kid", ("fidelity", "kid"), ("mean", "value")),
    ("precision", ("fidelity", "precision"), ("value",)),
    ("recall", ("fidelity", "recall"), ("value",)),
    ("density", ("fidelity", "density"), ("value",)),
    ("coverage", ("fidelity", "coverage"), ("value",)),
    ("ms_ssim.synthetic", ("diversity", "synthetic"), ("mean",)),
    ("ms_ssim.real", ("diversity", "real"), ("mean",)),
    ("memorization.copy_max", ("memorization", "copy_similarity"), ("max",)),
    ("memorization.ssim_max", ("memorization", "ssim"), ("max",)),  # evaluations before calibrated copy similarity
    ("memorization.cosine_max", ("memorization", "feature_cosine"), ("max",)),
    ("memorization.flagged_fraction", ("memorization", "flagged_fraction"), ()),
    ("utility_auc.real", ("utility", "real"), ("auc",)),
    ("utility_auc.synthetic", ("utility", "synthetic"), ("auc",)),
    ("utility_auc.real+synthetic", ("utility", "real+synthetic"), ("auc",)),
    ("utility_gain.real+synthetic", ("utility", "real+synthetic", "minus_real"), ("value",)),
    ("conditioning.label_auc", ("utility", "conditioning", "label", "auc"), ("value",)),
    ("conditioning.label_balanced_accuracy", ("utility", "conditioning", "label", "balanced_accuracy"), ("value",)),
    ("conditioning.sex_auc", ("utility", "conditioning", "sex", "auc"), ("value",)),
]
"""The headline numbers of synthcxr's own evaluation JSON, in the order the report shows them."""


def _curated(data: dict[str, Any], curated: list[tuple[str, tuple[str, ...], tuple[str, ...]]] | None = None) -> list[Metric]:
    out = []
    for name, path, keys in CURATED if curated is None else curated:
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node):
            out.append(Metric(name, float(node)))
        elif isinstance(node, dict) and (value := _first(node, keys)) is not None:
            metric = _metric_from(name, {**node, "value": value})
            if metric is not None:
                out.append(metric)
    if curated is None:
        out += _feature_spaces(data)
    return out


def _feature_spaces(data: dict[str, Any]) -> list[Metric]:
    """Fidelity in each extra feature space as `fid[dinov2]`, ..., CMMD as `cmmd[clip]`, and re-ID scores:
    one column group per extractor, so numbers of different feature spaces never share a column."""
    out: list[Metric] = []
    fidelity = [row for row in CURATED if row[1][0] == "fidelity"]
    for table in data.get("fidelity_by_extractor") or []:
        if isinstance(table, dict):
            name = (table.get("extractor") or {}).get("name", "extra")
            out += _curated(table, [(f"{col}[{name}]", path[1:], keys) for col, path, keys in fidelity])
    cmmd = data.get("cmmd")
    if isinstance(cmmd, dict) and (metric := _metric_from(f"cmmd[{(cmmd.get('extractor') or {}).get('name', 'clip')}]", cmmd)):
        out.append(metric)
    out += _curated(data, [("reid.mean", ("reid", "score"), ("mean",)), ("reid.max", ("reid", "score"), ("max",)),
                           ("reid.fraction_above", ("reid", "fraction_above"), ())])
    return out


def fidelity_tables(data: dict[str, Any]) -> list[tuple[dict[str, Any], list[Metric]]]:
    """(extractor, its numbers) for every feature space of one evaluation: the main extractor's fidelity,
    each `fidelity_by_extractor` table and CMMD. The extractor is {"name": str | None, "pretrained":
    bool | None}; None where the JSON does not say (then the numbers are not comparable with any other)."""
    def extractor(table: dict[str, Any]) -> dict[str, Any]:
        info = table.get("extractor") if isinstance(table.get("extractor"), dict) else {}
        pretrained = table.get("extractor_pretrained", info.get("pretrained"))
        return {"name": info.get("name"), "pretrained": pretrained if isinstance(pretrained, bool) else None}

    fidelity = [(col, path[1:], keys) for col, path, keys in CURATED if path[0] == "fidelity"]
    out = []
    for table in [data, *(data.get("fidelity_by_extractor") or [])]:
        node = data.get("fidelity") if table is data else table
        if isinstance(node, dict) and (metrics := _curated(node, fidelity)):
            out.append((extractor(table), metrics))
    cmmd = data.get("cmmd")
    if isinstance(cmmd, dict) and (metric := _metric_from("cmmd", cmmd)):
        out.append((extractor(cmmd), [metric]))
    return out


def extract_metrics(data: dict[str, Any], prefix: str = "", depth: int = 0) -> list[Metric]:
    """The numbers (with CIs when given) of an evaluation result.

    synthcxr's own results give the curated headline list; any other JSON falls back to every
    number found, named by its JSON path.
    """
    if depth == 0 and not prefix and any(k in data for k in ("fidelity", "diversity", "memorization", "utility", "cmmd", "reid")):
        return _curated(data)
    return _generic_metrics(data, prefix, depth)


def _generic_metrics(data: dict[str, Any], prefix: str = "", depth: int = 0) -> list[Metric]:
    out: list[Metric] = []
    for key, value in data.items():
        if key in SKIP_SECTIONS or key.startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            metric = _metric_from(name, value)
            if metric is not None:
                out.append(metric)
            elif depth < 3:
                out.extend(_generic_metrics(value, prefix=f"{name}.", depth=depth + 1))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            if key in SKIP_NUMBERS or key.startswith("n_"):
                continue
            out.append(Metric(name, float(value)))
    return out


def extract_memorization(data: dict[str, Any], eval_path: Path | None, limit: int) -> list[dict[str, Any]]:
    """Top nearest-neighbour pairs: [{"synthetic": Path, "train": Path, "score": float, "kind": str}]."""
    section = data.get("memorization")
    if not isinstance(section, dict):
        return []
    candidates = []
    for key in ("top_pairs", "pairs", "flagged", "top"):
        if isinstance(section.get(key), list):
            candidates = section[key]
            break
    else:
        for sub in section.values():
            if isinstance(sub, dict):
                for key in ("top_pairs", "pairs", "top"):
                    if isinstance(sub.get(key), list):
                        candidates.extend(sub[key])
    base = eval_path.parent if eval_path else Path(".")
    out = []
    for pair in candidates[:limit]:
        if not isinstance(pair, dict):
            continue
        syn = pair.get("synthetic") or pair.get("fake") or pair.get("generated") or pair.get("query")
        real = (pair.get("nearest_by_copy") or pair.get("nearest_by_ssim") or pair.get("train") or pair.get("real") or pair.get("nearest")
                or pair.get("match"))
        score = _first(pair, ("copy_similarity", "ssim", "similarity", "cosine", "feature_cosine", "score", "distance"))
        side = pair.get("side_by_side") or pair.get("image") or pair.get("pair_image")
        resolve = (lambda p: (Path(p) if Path(p).is_absolute() else base / p) if p else None)  # noqa: E731
        out.append({"synthetic": resolve(syn) if isinstance(syn, str) else None,
                    "train": resolve(real) if isinstance(real, str) else None,
                    "side_by_side": resolve(side) if isinstance(side, str) else None,
                    "score": score, "kind": pair.get("kind") or pair.get("metric") or (
                        "copy similarity" if "copy_similarity" in pair else "SSIM" if "ssim" in pair else ""),
                    "alignment": pair.get("alignment") if isinstance(pair.get("alignment"), dict) else None,
                    "cosine": _first(pair, ("feature_cosine",)), "flagged": bool(pair.get("flagged"))})
    return out


def find_images(path: Any, limit: int) -> list[Path]:
    """The first `limit` image files under a data path (or list of paths), in a stable order."""
    paths = path if isinstance(path, list) else [path]
    found: list[Path] = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES
                                and not any(part.startswith(".") for part in q.parts)))
    # interleave sources so Montgomery and Shenzhen both appear
    if len(paths) > 1:
        groups = [[q for q in found if str(q).startswith(str(Path(p)))] for p in paths if p is not None]
        found = [q for batch in _zip_longest(groups) for q in batch]
    return found[:limit]


def _zip_longest(groups: list[list[Path]]) -> list[list[Path]]:
    n = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# one run


def _train_run(run: RunData, train_dir: Path) -> None:
    if not train_dir.is_dir():
        return
    run.train_dir = train_dir
    cfg_path = train_dir / "config.yaml"
    if cfg_path.is_file() and run.config is None:
        try:
            run.config = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError:
            run.config = None
    run.metrics = read_jsonl(train_dir / "metrics.jsonl")
    run.train_summary = _load_json(train_dir / "summary.json") or {}


def load_grid_run(root: Path, name: str | None = None, spec: dict[str, Any] | None = None) -> RunData:
    """A run folder made by the grid (`runs/NAME/`), or a plain training run directory."""
    root = Path(root)
    state = _load_json(root / "run.json") or {}
    spec = spec or state
    run = RunData(name=name or state.get("name") or root.name, root=root,
                  axes=spec.get("axes") or {}, overrides=spec.get("overrides") or {},
                  baseline=bool(spec.get("baseline")), status=state.get("status"),
                  config=spec.get("train"))
    if (root / "error.txt").is_file():
        run.error = (root / "error.txt").read_text(errors="replace").strip()
        run.status = run.status or "failed"
    for logname in ("run.log", "accelerate.log"):
        if (root / logname).is_file():
            run.log = root / logname
            break
    if (root / "train").is_dir():
        _train_run(run, root / "train")
    elif (root / "metrics.jsonl").is_file() or (root / "config.yaml").is_file():
        _train_run(run, root)  # a bare training run directory
    for images in (root / "images", root / "generated"):
        if images.is_dir():
            run.images_dir = images
            run.manifest = read_jsonl(images / "manifest.jsonl")
            break
    else:
        samples = root / "samples"
        if run.train_dir is not None and (run.train_dir / "samples").is_dir():
            samples = run.train_dir / "samples"
        if samples.is_dir():
            run.images_dir = samples
            run.manifest = read_jsonl(samples / "manifest.jsonl") or [
                {"file": str(p.relative_to(samples)), "prompt": p.parent.name if p.parent != samples else "", "seed": None}
                for p in sorted(samples.rglob("*.png"))
            ]
    for eval_name in ("eval.json", "evaluation.json", "eval/eval.json"):
        if (root / eval_name).is_file():
            run.eval_path = root / eval_name
            run.eval = _load_json(root / eval_name)
            break
    return run


# ---------------------------------------------------------------------------------------------
# a grid (or one run)


def is_grid_dir(path: Path) -> bool:
    return (path / "grid.json").is_file() or (path / "runs").is_dir()


def load_report_data(path: str | Path, *, real_limit: int = 8) -> ReportData:
    """Collect a grid folder or a single run folder; fails only when nothing run-like is there."""
    root = Path(path)
    if not root.is_dir():
        raise SynthCXRError("folder not found", file=root, fix="pass a grid output folder (synthcxr grid --out) or a run folder")
    plan = _load_json(root / "grid.json")
    study = _load_json(root / "study" / "analysis.json") or _load_json(root / "study" / "analysis" / "analysis.json")
    if is_grid_dir(root):
        specs = {r["name"]: r for r in (plan or {}).get("runs", [])}
        names = list(specs)
        if (root / "runs").is_dir():
            names += sorted(p.name for p in (root / "runs").iterdir() if p.is_dir() and p.name not in specs)
        runs = [load_grid_run(root / "runs" / n, n, specs.get(n)) for n in names]
        title = f"synthcxr grid report: {(plan or {}).get('name') or root.name}"
        is_grid = True
    else:
        markers = ("run.json", "metrics.jsonl", "config.yaml", "eval.json", "images", "train", "DONE", RUN_MODEL_FILE)
        if not any((root / m).exists() for m in markers):
            raise SynthCXRError("no grid or run found in this folder", file=root,
                                fix="pass the --out folder of `synthcxr grid`, a grid run folder (runs/NAME) or a training run directory")
        runs = [load_grid_run(root)]
        title = f"synthcxr run report: {runs[0].name}"
        is_grid = False
    real_source = None
    if plan:
        real_source = (plan.get("evaluate") or {}).get("real") or ((plan.get("base") or {}).get("data") or {}).get("path")
    if real_source is None:
        for run in runs:
            if run.config and (run.config.get("data") or {}).get("path"):
                real_source = run.config["data"]["path"]
                break
    return ReportData(title=title, root=root, runs=runs, plan=plan, study=study,
                      study_dir=root / "study" if (root / "study").is_dir() else None,
                      real_images=find_images(real_source, real_limit) if real_source else [], is_grid=is_grid)
