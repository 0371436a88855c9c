"""Study designs: which images each reader sees, in which order and arrangement.

- single: one image at a time (rated); paired: a real and a synthetic image side by side, "which
  one is synthetic?" (two-alternative forced choice, 2AFC).
- calibration: a few extra images (or pairs) first, each followed by the right answer; they are
  never analysed.
- counterbalancing: with several models, the main images come in one block per model, and the
  order of the blocks follows a Williams Latin square over readers (each model equally often in
  each position, and each model equally often right after each other model for an even count).

Everything random here is drawn from an `random.Random` the caller seeds from the study's secret.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from synthcxr.errors import StudyError

DESIGNS = ("single", "paired")


def check_design(design: str) -> str:
    if design not in DESIGNS:
        from synthcxr.errors import did_you_mean

        raise StudyError(f"unknown study design {design!r}{did_you_mean(design, DESIGNS)}",
                         fix=f"use --design {' or --design '.join(DESIGNS)}")
    return design


def williams_square(n: int) -> list[list[int]]:
    """Rows of a Williams (balanced Latin) square for `n` treatments: n rows for even n, 2n for odd n
    (each row reversed as well), so every treatment precedes every other equally often."""
    if n <= 0:
        return []
    first = [0]
    low, high = 1, n - 1
    for k in range(1, n):
        if k % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    if n % 2:
        rows += [list(reversed(row)) for row in rows]
    return rows


def block_order(blocks: Sequence[str], reader_index: int) -> list[str]:
    """The block (model) order of the `reader_index`-th reader (0-based, in the order readers were added)."""
    rows = williams_square(len(blocks))
    return [blocks[i] for i in rows[reader_index % len(rows)]] if rows else []


def make_pairs(real: Sequence[dict[str, Any]], synthetic: Sequence[dict[str, Any]],
               rng: random.Random) -> list[dict[str, Any]]:
    """Pair every synthetic image with a real one of the same label and sex where known.

    `real`/`synthetic`: dicts with id, model, label and sex. Within one model each real image is
    used as evenly as possible (once each while there are enough), preferring the same label and
    sex, then the same label, then any. Returns [{"real": id, "synthetic": id, "model": name,
    "label": shared label or None, "sex": shared sex or None}].
    """
    if not synthetic:
        return []
    if not real:
        raise StudyError("a paired study needs real images to pair with the synthetic ones", fix="pass --real")
    pairs = []
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for img in synthetic:
        by_model[img["model"]].append(img)
    for model in sorted(by_model):
        uses: dict[str, int] = defaultdict(int)
        syn = sorted(by_model[model], key=lambda i: i["id"])
        rng.shuffle(syn)
        for img in syn:
            same_label = [r for r in real if img.get("label") and r.get("label") == img["label"]]
            same_both = [r for r in same_label if img.get("sex") and r.get("sex") == img["sex"]]
            pool = same_both or same_label or list(real)
            least = min(uses[r["id"]] for r in pool)
            candidates = sorted((r for r in pool if uses[r["id"]] == least), key=lambda r: r["id"])
            partner = rng.choice(candidates)
            uses[partner["id"]] += 1
            matched = bool(img.get("label")) and partner.get("label") == img.get("label")
            pairs.append({"real": partner["id"], "synthetic": img["id"], "model": model,
                          "label": img.get("label") if matched else None,
                          "sex": img.get("sex") if matched and partner.get("sex") == img.get("sex") else None})
    return pairs


def balanced_sides(n: int, rng: random.Random) -> list[bool]:
    """For `n` pairs: True = synthetic on the left. Exactly half left (one more on a coin when odd),
    shuffled, so a reader who always answers 'left' scores 50%."""
    left = n // 2 + (rng.random() < 0.5 if n % 2 else 0)
    sides = [True] * left + [False] * (n - left)
    rng.shuffle(sides)
    return sides


def split_real_into_blocks(real_ids: Sequence[str], blocks: Sequence[str], rng: random.Random) -> dict[str, list[str]]:
    """Spread the real controls evenly over the model blocks (each block: its model's images and its
    share of real ones, so every block has both and a block is not all-synthetic)."""
    ids = sorted(real_ids)
    rng.shuffle(ids)
    out: dict[str, list[str]] = {b: [] for b in blocks}
    for n, image_id in enumerate(ids):
        out[blocks[n % len(blocks)]].append(image_id)
    return out
