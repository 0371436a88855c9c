"""Typed configs: pydantic models loaded from YAML, overridden with `--set a.b=c`, saved beside runs.

Every stage defines its config as a `StrictModel`; unknown keys and bad values fail before any work,
naming the key, the allowed values and a "did you mean".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from synthcxr.errors import ConfigError, did_you_mean

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optimizer.lr=1e-4` -> (["optimizer", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} has no '='", fix="write overrides as --set section.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key", fix="write overrides as --set section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        set_nested(data, path, value, what=f"override {text!r}")
    return data


def set_nested(data: dict[str, Any], path: list[str], value: Any, *, what: str) -> None:
    """Set data[path[0]][path[1]]... = value, creating sections on the way; `what` names the
    setting in the error when a section on the path is already a plain value."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", file=path, fix="check the path, or start from a file in configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=path, fix="fix the YAML syntax at the line shown") from exc
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping of sections", file=path)
    return data


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at `loc`, for "did you mean" suggestions."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = did_you_mean(str(loc[-1]), allowed, prefix="".join(f"{p}." for p in loc[:-1]))
            lines.append(f"unknown key {key!r}{hint}; allowed here: {', '.join(allowed)}")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError(
        "invalid config:\n  - " + "\n  - ".join(lines),
        file=source,
        fix="correct the keys/values above in the YAML file or the --set overrides",
    )


def build_config(model: type[M], data: dict[str, Any], source: str = "<config>") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(model, exc, source) from None


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """YAML file (optional) + `--set` overrides -> validated config."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return build_config(model, data, str(path) if path else "--set overrides")


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config (every default filled in) so a run can be reproduced exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
    return path
