"""Which architecture a single-file checkpoint holds, read from its tensor names and shapes only.

diffusers' `infer_diffusers_model_type` looks at key names and a few shapes; for a .safetensors
file both come from the file header, so no weights are read (a 10 GB checkpoint answers at once).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class _Shape:
    __slots__ = ("shape",)

    def __init__(self, shape: list[int]):
        self.shape = tuple(shape)


class _HeaderView(Mapping[str, Any]):
    """A read-only mapping key -> object with `.shape`, backed by a safetensors header."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._keys = list(handle.keys())
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> _Shape:
        if key not in self._set:
            raise KeyError(key)
        return _Shape(self._handle.get_slice(key).get_shape())

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def infer_single_file_type(path: Path) -> str | None:
    """diffusers' model type name ("v1", "xl_base", "sd3", "sd35_medium", ...), or None when the file
    cannot be read without loading it (.ckpt/.pt/.bin) or is not recognised."""
    if path.suffix != ".safetensors":
        return None
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return infer_diffusers_model_type(_HeaderView(handle))
    except Exception:  # unreadable or unusual layout: loading reports the real problem later
        return None


def check_single_file_config(path: Path, family: Any, config: Any) -> None:
    """Fail at once when a single file cannot be built offline: diffusers takes its architecture config
    (and any components the file lacks, such as SD3's T5) from a hub repo; without `config`, that repo
    must be cached or the hub reachable. Files whose type is not inferable are left to loading."""
    if config is not None:
        return
    kind = infer_single_file_type(path)
    if kind is None:
        return
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS
    from huggingface_hub import try_to_load_from_cache

    from synthcxr.errors import ModelError
    from synthcxr.models.load import hub_reachable

    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(kind, {}).get("pretrained_model_name_or_path")
    if repo is None or isinstance(try_to_load_from_cache(repo, "model_index.json"), str) or hub_reachable():
        return
    raise ModelError(f"single-file {family.label} checkpoint ({kind}): its architecture config comes from {repo}, "
                     "which is not in the local Hugging Face cache, and the hub cannot be reached", file=path,
                     fix=f"set model.single_file_config (generate: --single-file-config DIR) to a local diffusers "
                     f"folder of the same architecture (e.g. a download of {repo}), or convert the file to a "
                     "diffusers folder")
