"""FID/KID/PRDC (and their jackknife intervals) for sets too large for N x N matrices in memory.

`fidelity.KernelMatrices` and `fidelity.PRDCDistances` hold six full pairwise matrices: 100k x 100k
float64 is 80 GB each. The classes here answer the same questions (`mmd2(ir, jf)`, `values(ir, jf)`)
from the features alone, one block of rows at a time, so memory is O(block x N) on top of the
features, and give the same numbers:

- KID subsets (1000 images) are computed directly from their features; a jackknife replicate
  (one group left out) is the all-pairs unbiased MMD^2, which needs only the kernel sums between
  groups (G x G numbers gathered in one blocked pass).
- PRDC: each point's nearest neighbours (the k-th gives its radius) come from one blocked pass per
  set, keeping the `k + 1 + extra` nearest; a replicate's radius skips the left-out neighbours (a row
  whose kept list runs short is recomputed exactly). Radii only grow when points are left out, so
  one blocked pass over the real x synthetic distances keeps every pair inside the largest radius
  any replicate uses, and every replicate's precision, recall, density and coverage is counted from
  those pairs exactly.

The jackknife groups are drawn as `fidelity.jackknife_intervals` draws them (same seed, same order),
so the replicates asked for are recognised by the group they leave out; any other subset is
computed exactly the slow way.
"""

from __future__ import annotations

import numpy as np

from synthcxr.evaluate.fidelity import _check, jackknife_parts, mmd2_unbiased, polynomial_kernel

BLOCK = 1024
"""Rows per block: a block x N float64 matrix (1024 x 100k = 0.8 GB) is the largest temporary."""
IN_MEMORY_LIMIT = 4 * 1024**3
"""Bytes of pairwise matrices up to which the in-memory classes are used (they are faster)."""


def in_memory_bytes(n_real: int, n_fake: int) -> int:
    """Bytes the in-memory kernel and distance matrices take (3 + 3 float64 matrices)."""
    return 16 * (n_real * n_real + n_fake * n_fake + n_real * n_fake)


def jackknife_groups(n_real: int, n_fake: int, groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Group label of each real and synthetic image, as `jackknife_intervals` splits them (-1: no groups)."""
    labels = [np.full(n_real, -1, np.int64), np.full(n_fake, -1, np.int64)]
    if groups > 0:
        for lab, parts in zip(labels, jackknife_parts(n_real, n_fake, groups, seed), strict=True):
            for g, part in enumerate(parts):
                lab[part] = g
    return labels[0], labels[1]


def _left_out_group(idx: np.ndarray | None, labels: np.ndarray) -> int | None:
    """-1 when `idx` keeps everything, g when it keeps all but group g, else None (any other subset)."""
    n = len(labels)
    if idx is None or len(idx) == n:
        return -1 if idx is None or np.array_equal(idx, np.arange(n)) else None
    missing = np.ones(n, bool)
    missing[idx] = False
    g = labels[np.flatnonzero(missing)[0]]
    if g < 0 or not np.array_equal(np.flatnonzero(missing), np.flatnonzero(labels == g)) or len(np.unique(idx)) != len(idx):
        return None
    return int(g)


def _distances(x: np.ndarray, x2: np.ndarray, y: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """Euclidean distances, written as `fidelity._pairwise` writes them (same rounding)."""
    return np.sqrt(np.clip(x2[:, None] + y2[None, :] - 2.0 * x @ y.T, 0, None))


# --------------------------------------------------------------------------- KID
class BlockedKernels:
    """`mmd2(ir, jf)` of the cubic polynomial kernel without N x N kernel matrices."""

    def __init__(self, real: np.ndarray, fake: np.ndarray, *, groups: int = 0, seed: int = 0, block: int = BLOCK):
        self.real = np.asarray(real, np.float64)
        self.fake = np.asarray(fake, np.float64)
        self.block = block
        self.lab_r, self.lab_f = jackknife_groups(len(real), len(fake), groups, seed)
        self._sums: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def _group_sums(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per set pair: (G x G kernel sums between groups, per-group diagonal sums)."""
        if self._sums is None:
            self._sums = {}
            for key, x, lx, y, ly in (("rr", self.real, self.lab_r, self.real, self.lab_r),
                                      ("ff", self.fake, self.lab_f, self.fake, self.lab_f),
                                      ("rf", self.real, self.lab_r, self.fake, self.lab_f)):
                gx, gy = lx.max() + 1, ly.max() + 1
                onehot_y = np.zeros((len(y), gy))
                onehot_y[np.arange(len(y)), ly] = 1.0
                sums, diag = np.zeros((gx, gy)), np.zeros(gx)
                for s in range(0, len(x), self.block):
                    k = polynomial_kernel(x[s:s + self.block], y)
                    np.add.at(sums, lx[s:s + self.block], k @ onehot_y)
                    if key != "rf":
                        np.add.at(diag, lx[s:s + self.block], np.diagonal(k, offset=s)[:len(k)] if s < k.shape[1] else 0)
                self._sums[key] = (sums, diag)
        return self._sums

    def mmd2(self, idx_r: np.ndarray, idx_f: np.ndarray) -> float:
        if len(idx_r) * len(idx_f) <= 4 * self.block * self.block:  # KID's subsets: small enough to compute
            r, f = self.real[idx_r], self.fake[idx_f]
            return mmd2_unbiased(polynomial_kernel(r, r), polynomial_kernel(f, f), polynomial_kernel(r, f))
        gr, gf = _left_out_group(idx_r, self.lab_r), _left_out_group(idx_f, self.lab_f)
        if gr is None or gf is None or self.lab_r[0] < 0:
            return self._mmd2_direct(idx_r, idx_f)
        (s_rr, d_rr), (s_ff, d_ff), (s_rf, _) = (self._group_sums()[k] for k in ("rr", "ff", "rf"))
        keep_r = np.ones(len(s_rr), bool)
        keep_f = np.ones(len(s_ff), bool)
        if gr >= 0:
            keep_r[gr] = False
        if gf >= 0:
            keep_f[gf] = False
        m, n = len(idx_r), len(idx_f)
        sum_xx = s_rr[np.ix_(keep_r, keep_r)].sum() - d_rr[keep_r].sum()
        sum_yy = s_ff[np.ix_(keep_f, keep_f)].sum() - d_ff[keep_f].sum()
        return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * s_rf[np.ix_(keep_r, keep_f)].sum() / (m * n))

    def _mmd2_direct(self, idx_r: np.ndarray, idx_f: np.ndarray) -> float:
        """Any subsets, in blocks (slow; only for subsets that are neither small nor a jackknife replicate)."""
        r, f = self.real[idx_r], self.fake[idx_f]
        total = {"rr": 0.0, "ff": 0.0, "rf": 0.0}
        for key, x, y in (("rr", r, r), ("ff", f, f), ("rf", r, f)):
            for s in range(0, len(x), self.block):
                k = polynomial_kernel(x[s:s + self.block], y)
                total[key] += k.sum() - (np.diagonal(k, offset=s).sum() if key != "rf" else 0.0)
        m, n = len(r), len(f)
        return float(total["rr"] / (m * (m - 1)) + total["ff"] / (n * (n - 1)) - 2.0 * total["rf"] / (m * n))


# --------------------------------------------------------------------------- PRDC
def _nearest(x: np.ndarray, x2: np.ndarray, count: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and distances of each point's `count` nearest points of the same set (itself included), sorted."""
    n = len(x)
    count = min(count, n)
    idx = np.empty((n, count), np.int64)
    dist = np.empty((n, count))
    for s in range(0, n, block):
        d = _distances(x[s:s + block], x2[s:s + block], x, x2)
        part = np.argpartition(d, count - 1, axis=1)[:, :count]
        pd = np.take_along_axis(d, part, axis=1)
        order = np.argsort(pd, axis=1, kind="stable")
        idx[s:s + block] = np.take_along_axis(part, order, axis=1)
        dist[s:s + block] = np.take_along_axis(pd, order, axis=1)
    return idx, dist


class BlockedPRDC:
    """`values(ir, jf)`: PRDC of any subsets, equal to `fidelity.PRDCDistances`, in O(block x N) memory."""

    def __init__(self, real: np.ndarray, fake: np.ndarray, k: int = 5, *, groups: int = 0, seed: int = 0,
                 block: int = BLOCK, extra: int = 16):
        _check(real, fake, k + 1, f"precision/recall/density/coverage (k={k})")
        self.k, self.block = k, block
        self.real = np.asarray(real, np.float64)
        self.fake = np.asarray(fake, np.float64)
        self.r2, self.f2 = (self.real ** 2).sum(1), (self.fake ** 2).sum(1)
        self.lab_r, self.lab_f = jackknife_groups(len(real), len(fake), groups, seed)
        # 1. nearest neighbours within each set -> radii of the full set and of every replicate
        self.near_r = _nearest(self.real, self.r2, k + 1 + extra, block)
        self.near_f = _nearest(self.fake, self.f2, k + 1 + extra, block)
        self.radii_r = {g: self._radii(self.real, self.r2, self.near_r, self.lab_r, g) for g in self._groups(self.lab_r)}
        self.radii_f = {g: self._radii(self.fake, self.f2, self.near_f, self.lab_f, g) for g in self._groups(self.lab_f)}
        # 2. every real x synthetic pair inside the largest radius any replicate uses
        reach_r = np.max(np.stack(list(self.radii_r.values())), axis=0)
        reach_f = np.max(np.stack(list(self.radii_f.values())), axis=0)
        self.pairs = self._pairs(self.real, self.r2, self.fake, self.f2, reach_r, reach_f)

    @staticmethod
    def _groups(labels: np.ndarray) -> list[int]:
        return [-1, *range(labels.max() + 1)] if labels[0] >= 0 else [-1]

    def _radii(self, x: np.ndarray, x2: np.ndarray, near: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
               group: int, keep: np.ndarray | None = None) -> np.ndarray:
        """k-th neighbour distance of each point among the kept points (group `group` or ~`keep` left out)."""
        idx, dist = near
        if keep is None:
            keep = labels != group if group >= 0 else np.ones(len(x), bool)
        ok = keep[idx]
        rank = np.cumsum(ok, axis=1)
        found = rank[:, -1] > self.k
        pos = np.argmax(rank > self.k, axis=1)  # first kept entry with k kept before it
        radii = np.where(found, dist[np.arange(len(x)), pos], 0.0)  # 0: a left-out point reaches nothing
        kept = np.flatnonzero(keep)
        for i in np.flatnonzero(~found & keep):  # the stored list ran short: this row exactly
            d = _distances(x[i:i + 1], x2[i:i + 1], x[kept], x2[kept])[0]
            radii[i] = np.partition(d, self.k)[self.k]
        return radii

    def _pairs(self, real, r2, fake, f2, reach_r, reach_f) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols, ds = [], [], []
        for s in range(0, len(real), self.block):
            d = _distances(real[s:s + self.block], r2[s:s + self.block], fake, f2)
            i, j = np.nonzero((d < reach_r[s:s + self.block, None]) | (d < reach_f[None, :]))
            rows.append(i + s)
            cols.append(j)
            ds.append(d[i, j])
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(ds)

    def values(self, idx_r: np.ndarray | None = None, idx_f: np.ndarray | None = None) -> dict[str, float]:
        gr, gf = _left_out_group(idx_r, self.lab_r), _left_out_group(idx_f, self.lab_f)
        if gr is None or gf is None:  # not a replicate we prepared: compute it from scratch
            r = self.real if idx_r is None else self.real[idx_r]
            f = self.fake if idx_f is None else self.fake[idx_f]
            return BlockedPRDC(r, f, self.k, block=self.block).values()
        keep_r = self.lab_r != gr if gr >= 0 else np.ones(len(self.real), bool)
        keep_f = self.lab_f != gf if gf >= 0 else np.ones(len(self.fake), bool)
        rad_r, rad_f = self.radii_r[gr], self.radii_f[gf]
        i, j, d = self.pairs
        sel = keep_r[i] & keep_f[j]
        i, j, d = i[sel], j[sel], d[sel]
        n_r, n_f = int(keep_r.sum()), int(keep_f.sum())
        inside_real = d < rad_r[i]  # fake j inside real i's ball
        return {
            "precision": len(np.unique(j[inside_real])) / n_f,
            "recall": len(np.unique(i[d < rad_f[j]])) / n_r,
            "density": float(inside_real.sum() / n_f / self.k),
            "coverage": len(np.unique(i[inside_real])) / n_r,
        }


def pairwise_stats(real: np.ndarray, fake: np.ndarray, k: int, *, groups: int, seed: int,
                   limit: int | None = None) -> tuple[object, object]:
    """(kernels, distances) for `fidelity_metrics`: the in-memory matrices when they fit in `limit`
    bytes (default `IN_MEMORY_LIMIT`), else the blocked classes (same numbers, bounded memory)."""
    from synthcxr.evaluate.fidelity import KernelMatrices, PRDCDistances

    if in_memory_bytes(len(real), len(fake)) <= (IN_MEMORY_LIMIT if limit is None else limit):
        return KernelMatrices(real, fake), PRDCDistances(real, fake, k)
    from synthcxr.logging_utils import get_logger

    get_logger(__name__).info("%d x %d images: KID and PRDC computed in blocks (pairwise matrices would take %.1f GB)",
                              len(real), len(fake), in_memory_bytes(len(real), len(fake)) / 1e9)
    return (BlockedKernels(real, fake, groups=groups, seed=seed),
            BlockedPRDC(real, fake, k, groups=groups, seed=seed))
