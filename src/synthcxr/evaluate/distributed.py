"""`synthcxr evaluate` under torchrun / `accelerate launch`: the ranks share the feature extraction.

Features are the expensive part of evaluating a large set (a forward pass per image); the metrics
on the N x D features are not. So every rank computes the features of its share of every image set
into the content-hash feature cache, the ranks wait for each other, and rank 0 then runs the one
ordinary `evaluate`, which finds every feature in the cache and writes the results. The other ranks
end there. Ranks are detected as generation detects them (`generate.shard.Shard`: RANK, WORLD_SIZE).

The split follows generation's rule: whole batches, batch k of a set to rank k mod world. An image
is then computed in the same batch as in a single-process run, so the features, and every number,
equal that run's bit for bit. The cache is the hand-over, so it must be shared by all ranks (on
several nodes: `cache_dir` / `$SYNTHCXR_CACHE_DIR` on a shared file system); rank 0 warns when it
had to compute features the others should have left there.
"""

from __future__ import annotations

from typing import Any

from synthcxr.errors import ConfigError
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)


def feature_jobs(cfg: Any, sets: dict[str, Any]) -> list[tuple[Any, list[str]]]:
    """(extractor config, roles) for every feature `evaluate(cfg)` will look up."""
    from synthcxr.evaluate.run import feature_roles

    roles, _ = feature_roles(cfg, sets)
    jobs = [(cfg.extractor, roles)] if roles else []
    if "fidelity" in cfg.metrics:
        jobs += [(ext, ["real", "fake"]) for ext in cfg.extractors]
    if "cmmd" in cfg.metrics:
        jobs.append((cfg.cmmd.extractor, ["real", "fake"]))
    return jobs


def extract_share(cfg: Any, sets: dict[str, Any], shard: Any) -> dict[str, int]:
    """This rank's share of every feature job, into the feature cache; returns images per role computed."""
    from synthcxr.evaluate.features import FeatureCache, build_extractor, default_cache_dir, extract_features

    cache_dir = cfg.cache_dir or default_cache_dir()
    done: dict[str, int] = {}
    for ext_cfg, roles in feature_jobs(cfg, sets):
        # `auto` on a multi-GPU node: this rank's GPU
        extractor = build_extractor(ext_cfg.model_copy(update={"device": shard.device(ext_cfg.device)}), cache_dir)
        cache = FeatureCache(cache_dir / "features.sqlite")
        try:
            for role in roles:
                image_set = sets[role] if role in sets else sets["real"]  # no --train: the real images are the training set
                mine = shard.share(list(image_set.paths), ext_cfg.batch_size)
                # unreadable files are left to rank 0, which reports them as a single process would
                res = extract_features(mine, extractor, cache, batch_size=ext_cfg.batch_size, on_error="skip",
                                       description=f"{role} features, rank {shard.rank + 1}/{shard.world}",
                                       num_workers=ext_cfg.num_workers)
                done[f"{extractor.name}:{role}"] = res.computed
        finally:
            cache.close()
    return done


def evaluate_ranks(cfg: Any, shard: Any) -> dict[str, Any] | None:
    """Every rank: its share of the features; rank 0: then the whole evaluation (its results; None elsewhere)."""
    from synthcxr.evaluate.run import evaluate, read_sets
    from synthcxr.generate.shard import _dist

    if not cfg.cache:
        raise ConfigError("several processes hand their features over through the feature cache, which is off "
                          "(cache: false)", fix="drop `--set cache=false`, or run `synthcxr evaluate` as one process")
    sets = read_sets(cfg)
    done = extract_share(cfg, sets, shard)
    log.info("rank %d/%d computed %d feature(s) of its share", shard.rank + 1, shard.world, sum(done.values()))
    dist = _dist()
    dist.barrier()  # every share is in the cache
    dist.destroy_process_group()  # no more collectives: rank 0's metrics may take longer than any timeout
    if shard.rank != 0:
        return None
    results = evaluate(cfg)
    missed = sum(c["computed"] for c in (results.get("features") or {}).values())
    if missed:
        log.warning("rank 0 computed %d feature(s) that the other ranks should have cached: is the feature cache "
                    "(cache_dir or $SYNTHCXR_CACHE_DIR) one folder shared by every rank?", missed)
    return results
