"""Several processes making one generation: ranks of one torchrun/accelerate job, or cluster shards.

Rules the byte-identical guarantee rests on:
- the work is split by *batch*, never inside one: batch k (images [k*B, (k+1)*B)) belongs to shard
  k mod N, so every image is computed in the same batch, with the same seed (`seed + i`), as in a
  single-process run, and the files are byte-identical whatever N is;
- the split is static (by batch number, not by what is left), so processes that look at the folder
  at different moments still agree, and a resumed shard only makes its own missing images.

Bookkeeping: each process appends to its own shard manifest (`manifest.shard-RRRRR.jsonl`); the
holder of the output lock merges them into `manifest.jsonl` in one atomic rewrite at the end (and
at the start of the next run, after an interruption). One torchrun/accelerate job holds the folder's
lock on rank 0 while its ranks cooperate; cluster shards each lock their own shard, and the
submitting command holds the folder's lock while it waits for them.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthcxr.errors import ConfigError, SynthCXRError
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    group: bool = False
    """Ranks of one torch.distributed job (they share rank 0's lock and wait for each other)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard:
        """RANK / WORLD_SIZE as torchrun and `accelerate launch` set them; one process otherwise."""
        env = os.environ if env is None else env
        try:
            world, rank = int(env.get("WORLD_SIZE") or 1), int(env.get("RANK") or 0)
        except ValueError:
            raise ConfigError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} are not numbers",
                              fix="start with torchrun or accelerate launch, or unset RANK and WORLD_SIZE") from None
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}", fix="unset RANK and WORLD_SIZE, or fix them")
        if world > 1 and not env.get("MASTER_ADDR"):
            raise ConfigError(f"WORLD_SIZE={world} is set but MASTER_ADDR is not, so the processes cannot meet",
                              fix="start with torchrun or accelerate launch (they set both), or unset RANK and WORLD_SIZE")
        return cls(rank, world, group=world > 1)

    @property
    def manifest(self) -> str | None:
        from synthcxr.generate.manifest import shard_manifest

        return shard_manifest(self.rank) if self.world > 1 else None

    def batches(self, batches: list[tuple[list[Any], set[int]]], batch_size: int) -> list[tuple[list[Any], set[int]]]:
        """This shard's batches: batch k (by its first image's index) when k mod world == rank."""
        return [b for b in batches if (b[0][0].index // batch_size) % self.world == self.rank]

    def share(self, items: list[Any], batch_size: int) -> list[Any]:
        """This shard's items, in whole batches: items [k*B, (k+1)*B) when k mod world == rank."""
        return [x for i, x in enumerate(items) if (i // batch_size) % self.world == self.rank]

    def device(self, device: str) -> str:
        """`auto` on a multi-GPU job: this rank's GPU (LOCAL_RANK)."""
        if self.group and device == "auto":
            import torch

            if torch.cuda.is_available():
                return f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank)) % torch.cuda.device_count()}"
        return device


# --------------------------------------------------------------------------- one torch.distributed job
def _dist():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # CPU collectives are all we need (a few small messages)
    return dist


def _on_rank0(shard: Shard, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0; every rank gets its result or raises its user-facing error."""
    dist = _dist()
    result: list[Any] = [None]
    if shard.rank == 0:
        try:
            result = [("ok", fn())]
        except SynthCXRError as exc:
            result = [("error", exc)]
        except Exception as exc:  # noqa: BLE001 - rank 0's crash must not leave the others waiting
            result = [("error", SynthCXRError(f"rank 0 failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))]
    dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise value
    return value


@contextmanager
def hold_output(out: Path, shard: Shard) -> Iterator[None]:
    """The output folder's lock for this process, its job's ranks, or its cluster shard."""
    from synthcxr.generate.lock import output_lock
    from synthcxr.generate.manifest import merge_shards

    if shard.world == 1:
        with output_lock(out):
            yield
        return
    if not shard.group:  # a cluster shard: its own lock; the submitting command holds the folder's
        with output_lock(out, name=f".lock.shard-{shard.rank:05d}",
                         busy=(f"shard {shard.rank} of this generation is already running",
                               "wait for it; re-submitting later runs only the missing images")):
            yield
        return
    lock = output_lock(out)
    _on_rank0(shard, lock.__enter__)
    try:
        yield
        _dist().barrier()  # every rank has written its images and lines
        if shard.rank == 0:
            merged = merge_shards(out)
            log.info("merged %d manifest line(s) of %d ranks into %s", merged, shard.world, out / "manifest.jsonl")
    finally:
        if shard.rank == 0:
            lock.__exit__(None, None, None)


def open_manifest(out: Path, rows: dict[str, dict[str, Any]], shard: Shard) -> Any:
    """The folder's `ManifestState` for this process: rank 0 checks and cleans, the others only read."""
    from synthcxr.generate.manifest import ManifestState

    if shard.world == 1:
        return ManifestState.open(out, rows)
    if not shard.group:
        return ManifestState.open(out, rows, shard_file=shard.manifest, readonly=True)
    _on_rank0(shard, lambda: ManifestState.open(out, rows, readonly=False) and None)
    return ManifestState.open(out, rows, shard_file=shard.manifest, readonly=True)


# --------------------------------------------------------------------------- cluster shards (submitit)
def run_shard(cfg: Any, rank: int, shards: int) -> dict[str, Any]:
    """One cluster job: the images of shard `rank` of `shards` (resumable; skips finished images)."""
    from synthcxr.generate.sample import generate_images

    generate_images(cfg, shard=Shard(rank, shards))
    return {"shard": rank, "status": "done"}


def run_sharded(cfg: Any, shards: int, *, executor: Any = None, slurm: dict[str, Any] | None = None,
                task: Callable[..., Any] = run_shard) -> list[dict[str, Any]]:
    """Submit `shards` jobs (submitit; SLURM by default), wait, merge their manifests, report failures.

    A failed shard does not stop the others; re-running the same command runs only missing images.
    """
    from synthcxr.generate.lock import output_lock
    from synthcxr.generate.manifest import MANIFEST, merge_shards

    if shards < 1:
        raise ConfigError(f"--shards {shards} must be at least 1", fix="pass e.g. --shards 8")
    out = Path(cfg.out).resolve()  # the jobs may start elsewhere
    cfg = cfg.model_copy(update={"out": out})
    with output_lock(out):
        merge_shards(out)  # lines of an earlier, interrupted submission
        if executor is None:
            import submitit

            executor = submitit.AutoExecutor(folder=out / "slurm" / "%j")
            executor.update_parameters(**{"timeout_min": 24 * 60, "name": "synthcxr-generate", **(slurm or {})})
        jobs = [(rank, executor.submit(task, cfg, rank, shards)) for rank in range(shards)]
        log.info("submitted %d shard job(s): %s", shards, ", ".join(str(getattr(j, "job_id", "?")) for _, j in jobs))
        results = []
        for rank, job in jobs:
            try:
                results.append(job.result())
            except Exception as exc:  # noqa: BLE001 - one shard's death must not hide the others'
                stderr = getattr(getattr(job, "paths", None), "stderr", None)
                results.append({"shard": rank, "status": "failed", "error": f"{type(exc).__name__}: {exc}".strip()[:2000],
                                "log": str(stderr) if stderr else None})
        merged = merge_shards(out)
        log.info("merged %d manifest line(s) into %s", merged, out / MANIFEST)
    failed = [r for r in results if r["status"] != "done"]
    if failed:
        lines = "; ".join(f"shard {r['shard']}: {r['error'].splitlines()[0] if r['error'] else 'failed'}"
                          + (f" (log {r['log']})" if r.get("log") else "") for r in failed)
        raise SynthCXRError(f"{len(failed)} of {shards} shard(s) failed: {lines}", file=out,
                            fix="fix the cause, then re-run the same command: finished images are kept and only "
                                "the missing ones are generated")
    return results


def parse_slurm(items: list[str]) -> dict[str, Any]:
    """`--slurm key=value` options -> submitit parameters (numbers and true/false parsed as YAML)."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm {item!r} is not key=value", fix="write e.g. --slurm slurm_partition=gpu")
        params[key.strip()] = yaml.safe_load(value)
    return params
