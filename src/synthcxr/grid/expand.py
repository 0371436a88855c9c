"""Grid files: one base training config plus axes, expanded into named runs.

A grid file looks like this (see `configs/study_grid.yaml`):

```yaml
name: tb-study
base: lora_adamw.yaml          # a train config (path relative to this file, or a mapping)
set: {train.max_steps: 800}    # optional overrides applied to the base for every run
axes:
  model:                       # model.path; a label -> per-model overrides (or a list of paths)
    sdxl: {model.path: /models/sdxl, data.resolution: 1024, generate.resolution: 1024}  # generate.*: its sampling
  method: [dreambooth, lora]   # short name for method.name
  optimizer:                   # value -> override block applied on top for that value
    adamw: {optimizer.lr: 1.0e-4}
    prodigy: {optimizer.lr: 1.0}
exclude: [{method: dreambooth, optimizer: adamw8bit}]
include: [{method: lora, optimizer: adamw, set: {method.rank: 16}, name: lora-adamw-r16}]
baseline: true                 # the base model without fine-tuning: generate + evaluate only
generate: {...}                # shared generation settings (same prompts and seeds for every run)
evaluate: {...}                # shared evaluation settings
study: {...}                   # optional reader study across all runs
```

Expansion is pure and deterministic: the same file always gives the same run names in the same
order, which is what makes skipping finished runs and resuming safe.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from synthcxr.config import StrictModel, apply_overrides, build_config, read_yaml, set_nested
from synthcxr.errors import ConfigError, did_you_mean
from synthcxr.fileio import hash_strings

AXIS_ALIASES: dict[str, str] = {
    "model": "model.path",
    "method": "method.name",
    "optimizer": "optimizer.name",
    "lr": "optimizer.lr",
    "schedule": "schedule.name",
    "rank": "method.rank",
    "steps": "train.max_steps",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "resolution": "data.resolution",
    "seed": "train.seed",
}
"""Short axis names users type, mapped to the train-config key they set."""
GENERATE_PREFIX = "generate."
"""Axis-value block keys with this prefix set that run's generate settings, not its train config."""

BASELINE_NAME = "baseline"
_NAME_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class StudySpec(StrictModel):
    """A reader study across every run of the grid, created once all runs have finished."""

    enabled: bool = True
    name: str | None = None
    """Study name; defaults to the grid's name."""
    per_model: int = Field(10, ge=1)
    """Synthetic images per run shown to readers."""
    real_count: int = Field(10, ge=0)
    """Real control images mixed in."""
    readers: int = Field(3, ge=1)
    db: str | None = None
    """Database URL; defaults to a SQLite file inside the grid folder."""
    simulate: bool = False
    """Fill the study with simulated answers (demo and smoke tests only)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed to the study service's `create_study`."""


class BaselineSpec(StrictModel):
    """The pre-trained model without fine-tuning, generated and evaluated like every other run."""

    name: str = BASELINE_NAME
    model: str | None = None
    """Model to sample from; defaults to the base config's `model.path`."""


class LauncherSpec(StrictModel):
    """Settings for `--launcher accelerate` and `--launcher slurm`."""

    accelerate_args: list[str] = Field(default_factory=list)
    """Extra arguments for `accelerate launch`, e.g. ["--num_processes", "4", "--mixed_precision", "bf16"]."""
    slurm: dict[str, Any] = Field(default_factory=dict)
    """Parameters for submitit's `AutoExecutor.update_parameters` (timeout_min, slurm_partition, gpus_per_node, ...)."""


class GridConfig(StrictModel):
    """A grid file, validated (the per-run train configs are validated during expansion)."""

    name: str = "grid"
    base: Path | dict[str, Any]
    set: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any] | dict[str, dict[str, Any] | None]] = Field(default_factory=dict)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    baseline: bool | BaselineSpec = False
    generate: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    study: StudySpec | None = None
    launcher: LauncherSpec = Field(default_factory=LauncherSpec)


@dataclass
class RunSpec:
    """One run of the grid: a name, the axis values that produced it and its resolved train config."""

    name: str
    axes: dict[str, Any]
    train: dict[str, Any] | None
    """Resolved train config (every default filled in); None for the baseline."""
    model: str | None = None
    """For the baseline: the model sampled without training."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted keys this run changes relative to the base config (shown in the report)."""
    generate: dict[str, Any] = field(default_factory=dict)
    """This run's generate settings over the grid's shared ones (`generate.*` keys of its axis value's block:
    a family's own resolution, steps and guidance)."""

    @property
    def is_baseline(self) -> bool:
        return self.train is None

    def fingerprint(self) -> str:
        """Hash of what defines the run, so a finished run is never reused for a changed config."""
        return hash_strings([self.name, json.dumps(self.train, sort_keys=True, default=str), str(self.model)])[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "axes": self.axes, "train": self.train, "model": self.model,
                "overrides": self.overrides, "generate": self.generate, "baseline": self.is_baseline}


@dataclass
class GridPlan:
    """The expanded grid: runs plus the settings shared by all of them."""

    name: str
    runs: list[RunSpec]
    generate: dict[str, Any]
    evaluate: dict[str, Any]
    study: StudySpec | None
    launcher: LauncherSpec
    source: str = "<grid>"
    base: dict[str, Any] = field(default_factory=dict)

    def generate_for(self, run: RunSpec) -> dict[str, Any]:
        """The generate settings of one run: the shared ones with the run's own on top."""
        return {**self.generate, **run.generate}

    def select(self, only: list[str] | None) -> list[RunSpec]:
        """The runs named in `only` (all when empty); unknown names fail with a "did you mean"."""
        if not only:
            return list(self.runs)
        names = [r.name for r in self.runs]
        missing = [n for n in only if n not in names]
        if missing:
            hints = [f"{n!r}{did_you_mean(n, names)}" for n in missing]
            raise ConfigError(f"--only names no run of this grid: {', '.join(hints)}", file=self.source,
                              fix=f"use one of: {', '.join(names)}")
        return [r for r in self.runs if r.name in only]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "base": self.base, "runs": [r.to_dict() for r in self.runs],
                "generate": self.generate, "evaluate": self.evaluate,
                "study": self.study.model_dump(mode="json") if self.study else None}


# ---------------------------------------------------------------------------------------------
# helpers


def flatten(block: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 1}} and {"optimizer.lr": 1} both become {"optimizer.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in (block or {}).items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, prefix=f"{full}."))
        else:
            out[full] = value
    return out


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections on the way (values are already typed)."""
    set_nested(data, dotted.split("."), copy.deepcopy(value), what=f"cannot set {dotted!r}")


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (`X`, `X | None`, `A | B`, `Annotated[...]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [m for arg in typing.get_args(annotation) for m in _submodels(arg)]
    return []


def check_key(schema: type[BaseModel] | None, dotted: str, *, what: str, source: str) -> None:
    """Fail early, with a "did you mean", when a dotted key names no field of the train config.

    Sections typed as unions of models (e.g. per-method options) accept a key any member has;
    free-form sections (dicts) accept anything.
    """
    if schema is None:
        return
    models: list[type[BaseModel]] = [schema]
    walked: list[str] = []
    for part in dotted.split("."):
        fields = {name: f for m in models for name, f in m.model_fields.items()}
        if part not in fields:
            hint = did_you_mean(part, fields, prefix="".join(f"{w}." for w in walked))
            raise ConfigError(
                f"{what} sets unknown config key {dotted!r}{hint}",
                file=source,
                fix=f"allowed keys under {'.'.join(walked) or 'the top level'}: {', '.join(sorted(fields))}"
                + (f"; short axis names: {', '.join(AXIS_ALIASES)}" if what.startswith("axis") else ""),
            )
        walked.append(part)
        sub = [m for name, f in fields.items() if name == part for m in _submodels(f.annotation)]
        if not sub:
            return  # a value or a free-form section: nothing deeper to check
        models = sub


def _axis_path(axis: str, schema: type[BaseModel] | None, source: str) -> str:
    path = AXIS_ALIASES.get(axis, axis)
    if schema is None and "." not in path:
        raise ConfigError(
            f"axis {axis!r} is neither a short axis name nor a dotted config key{did_you_mean(axis, AXIS_ALIASES)}",
            file=source, fix=f"use one of {', '.join(AXIS_ALIASES)} or a key like optimizer.lr",
        )
    try:
        check_key(schema, path, what=f"axis {axis!r}", source=source)
    except ConfigError as exc:
        hint = did_you_mean(axis, AXIS_ALIASES)
        if hint and "." not in axis:
            raise ConfigError(f"unknown axis {axis!r}{hint}", file=source,
                              fix=f"use one of {', '.join(AXIS_ALIASES)} or a dotted config key like optimizer.lr") from None
        raise exc from None
    return path


def _value_label(axis: str, value: Any) -> str:
    """Readable name part: strings as they are (`lora`), numbers with the axis name (`lr0.0001`)."""
    if isinstance(value, str):
        # a model path is named by its last folder (`/models/sd35-medium` -> `sd35-medium`)
        text = Path(value.rstrip("/")).name or value if AXIS_ALIASES.get(axis, axis) == "model.path" else value
    else:
        short = axis.split(".")[-1]
        text = f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}"
    return _NAME_SAFE.sub("_", text).strip("_") or "x"


def _axis_values(axis: str, spec: list[Any] | dict[str, dict[str, Any] | None], source: str) -> list[tuple[Any, dict]]:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"axis {axis!r} has no values", file=source, fix="list at least one value")
        return [(v, {}) for v in spec]
    if not spec:
        raise ConfigError(f"axis {axis!r} has no values", file=source, fix="list at least one value")
    return [(_yaml_scalar(v), flatten(block)) for v, block in spec.items()]


def _yaml_scalar(text: Any) -> Any:
    """Mapping keys arrive as strings; `1e-4:` means the number, as it would in a list."""
    if not isinstance(text, str):
        return text
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, int | float | bool) and not isinstance(value, str) else text


def single_folder(path: Any) -> str | None:
    """One folder for a data path that may list several sets (Montgomery + Shenzhen -> their parent).

    Evaluation takes one folder and reads every Montgomery/Shenzhen set below it. Sets in different
    parent folders have no such folder: None (never a far-up common ancestor like `/`).
    """
    if path is None:
        return None
    if not isinstance(path, list):
        return str(path)
    if len(path) == 1:
        return str(path[0])
    parents = {str(Path(p).parent) for p in path}
    return parents.pop() if len(parents) == 1 else None


def _matches(combo: dict[str, Any], pattern: dict[str, Any]) -> bool:
    return all(str(combo.get(k)) == str(v) for k, v in pattern.items())


# ---------------------------------------------------------------------------------------------
# expansion


def load_grid(path: str | Path, overrides: list[str] | None = None) -> GridConfig:
    """Read and validate a grid file; `overrides` are `--set` strings on the grid itself."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return build_config(GridConfig, data, str(path))


def _load_base(grid: GridConfig, grid_file: Path | None) -> dict[str, Any]:
    if isinstance(grid.base, dict):
        return copy.deepcopy(grid.base)
    base = Path(grid.base)
    if not base.is_absolute() and grid_file is not None and (grid_file.parent / base).is_file():
        base = grid_file.parent / base
    return read_yaml(base)


def default_train_schema() -> type[BaseModel]:
    from synthcxr.train.config import TrainConfig

    return TrainConfig


def expand_grid(
    grid: GridConfig,
    *,
    grid_file: str | Path | None = None,
    schema: type[BaseModel] | None | Literal["default"] = "default",
) -> GridPlan:
    """Expand axes x values (minus `exclude`, plus `include`) into runs with validated train configs.

    `schema` is the train-config model used to validate each run (the real `TrainConfig` by
    default; tests may pass another model, or None to skip validation).
    """
    grid_file = Path(grid_file) if grid_file else None
    source = str(grid_file or "<grid>")
    if schema == "default":
        schema = default_train_schema()
    base = _load_base(grid, grid_file)
    base_set = flatten(grid.set)
    for key in base_set:
        check_key(schema, key, what="'set'", source=source)

    axis_paths = {axis: _axis_path(axis, schema, source) for axis in grid.axes}
    axis_values = {axis: _axis_values(axis, spec, source) for axis, spec in grid.axes.items()}
    for axis, values in axis_values.items():
        for value, block in values:
            for key in block:
                if not key.startswith(GENERATE_PREFIX):  # generate.* keys are checked with the run's settings
                    check_key(schema, key, what=f"axis {axis!r} value {value!r}", source=source)

    combos: list[tuple[dict[str, Any], dict[str, Any], str | None]] = []
    for picks in itertools.product(*axis_values.values()) if grid.axes else []:
        combo = {axis: value for axis, (value, _) in zip(grid.axes, picks, strict=True)}
        if any(_matches(combo, ex) for ex in grid.exclude):
            continue
        overrides: dict[str, Any] = {}
        for axis, (value, block) in zip(grid.axes, picks, strict=True):
            overrides[axis_paths[axis]] = value
            overrides.update(block)
        combos.append((combo, overrides, None))

    for entry in grid.include:
        entry = dict(entry)
        name = entry.pop("name", None)
        extra = flatten(entry.pop("set", None))
        overrides = {}
        for axis, value in entry.items():
            if axis not in grid.axes:
                raise ConfigError(
                    f"include entry {entry!r} names axis {axis!r}, which the grid does not have"
                    f"{did_you_mean(axis, grid.axes)}",
                    file=source, fix=f"use the axes {', '.join(grid.axes)} plus optional 'name' and 'set'",
                )
            overrides[axis_paths[axis]] = value
            blocks = dict(axis_values[axis])
            overrides.update(blocks.get(value, {}) if isinstance(grid.axes[axis], dict) else {})
        for key in extra:
            check_key(schema, key, what=f"include entry {name or entry!r}", source=source)
        overrides.update(extra)
        combos.append((entry, overrides, name))

    runs: list[RunSpec] = []
    for combo, overrides, name in combos:
        run_name = name or "-".join(_value_label(a, v) for a, v in combo.items()) or "run"
        data = copy.deepcopy(base)
        generate = {k.removeprefix(GENERATE_PREFIX): v for k, v in overrides.items() if k.startswith(GENERATE_PREFIX)}
        for key, value in {**base_set, **overrides}.items():
            if not key.startswith(GENERATE_PREFIX):
                set_path(data, key, value)
        resolved = data
        if schema is not None:
            cfg = build_config(schema, data, f"{source} (run {run_name!r})")
            resolved = cfg.model_dump(mode="json")
        runs.append(RunSpec(name=run_name, axes=combo, train=resolved, overrides=overrides, generate=generate))

    if grid.baseline:
        spec = grid.baseline if isinstance(grid.baseline, BaselineSpec) else BaselineSpec()
        model = spec.model or (base.get("model") or {}).get("path")
        if not model:
            raise ConfigError("baseline has no model", file=source,
                              fix="set baseline.model, or model.path in the base config")
        runs.insert(0, RunSpec(name=spec.name, axes={}, train=None, model=str(model)))

    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    dupes = [n for n, c in seen.items() if c > 1]
    if dupes:
        raise ConfigError(f"several runs are named {', '.join(map(repr, dupes))}", file=source,
                          fix="give include entries a distinct 'name', or remove duplicate axis values")
    if not runs:
        raise ConfigError("the grid expands to no runs", file=source,
                          fix="add axes values, include entries or baseline: true (check exclude)")
    evaluate = dict(grid.evaluate)
    if "real" not in evaluate:  # compare with the images the runs were trained on
        data_path = (base.get("data") or {}).get("path")
        real = single_folder(data_path)
        if data_path and real is None:
            raise ConfigError("the training data sets live in different folders, so the real images for evaluation "
                              "are ambiguous", file=source,
                              fix="set evaluate.real to one folder of real images (every Montgomery/Shenzhen set below it is read)")
        if real:
            evaluate["real"] = real
    if schema is not None:
        check_stage_settings(grid.generate, evaluate, source)
        for run in runs:
            if run.generate:
                check_stage_settings({**grid.generate, **run.generate}, evaluate, f"{source} (run {run.name!r})")
    return GridPlan(name=grid.name, runs=runs, generate=dict(grid.generate), evaluate=evaluate,
                    study=grid.study if grid.study and grid.study.enabled else None,
                    launcher=grid.launcher, source=source, base=base)


def check_stage_settings(generate: dict[str, Any], evaluate: dict[str, Any], source: str) -> None:
    """Validate the shared generate/evaluate settings now, so a typo fails before hours of training.

    The per-run keys (model/out, fake/out) are filled with placeholders; the grid sets them per run.
    """
    from synthcxr.evaluate.run import EvaluateConfig
    from synthcxr.generate.sample import GenerateConfig

    per_run = {"generate": {"model": "<run>", "out": "<run>/images"},
               "evaluate": {"fake": "<run>/images", "out": "<run>/eval.json"}}
    for what, model, given in (("generate", GenerateConfig, generate), ("evaluate", EvaluateConfig, evaluate)):
        for key in per_run[what]:
            if key in given:
                raise ConfigError(f"{what}.{key} is set by the grid for every run", file=source,
                                  fix=f"remove {what}.{key} from the grid file")
        build_config(model, {**given, **per_run[what]}, f"{source} ({what} settings)")


def load_plan(path: str | Path, overrides: list[str] | None = None,
              schema: type[BaseModel] | None | Literal["default"] = "default") -> GridPlan:
    """Grid file -> expanded plan (the one call the CLI makes)."""
    return expand_grid(load_grid(path, overrides), grid_file=path, schema=schema)
