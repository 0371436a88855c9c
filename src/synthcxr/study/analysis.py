"""Reader-study statistics: pure functions over answer rows, plus the table/plot writer.

Rows are the dicts of `service.ratings_table` (one per answer, unblinded). Main statistics use each
image's first showing only; repeated showings feed the intra-reader agreement alone.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synthcxr.fileio import atomic_write_json, atomic_write_text
from synthcxr.study.csvsafe import csv_text
from synthcxr.study.inference import suspicion

REAL = "real"
Z95 = 1.959963984540054


# --- basic estimators ----------------------------------------------------------------------------


def wilson_ci(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval: stays inside [0, 1] and behaves at 0/n and n/n, unlike the Wald one."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` (seeded, so reruns give the same numbers)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    stats = np.apply_along_axis(stat, 1, arr[idx]) if stat is not np.mean else arr[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)))


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence[Any], n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the mean that resamples whole clusters (images).

    Several readers rate the same image, so ratings are not independent; resampling images keeps
    each image's ratings together and gives honest (wider) intervals than resampling ratings.
    """
    vals = np.asarray(values, dtype=float)
    if vals.size == 0:
        return (math.nan, math.nan)
    keys = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    idx = np.array([keys[c] for c in clusters])
    sums = np.bincount(idx, weights=vals, minlength=len(keys))
    counts = np.bincount(idx, minlength=len(keys)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    stats = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)))


def auc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half (the Mann-Whitney AUC)."""
    pos = np.asarray(positive_scores, dtype=float)
    neg = np.asarray(negative_scores, dtype=float)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (controls the family-wise error rate), input order kept."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


# --- agreement -------------------------------------------------------------------------------------


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from a units x categories table of rating counts (same raters per unit)."""
    counts = np.asarray(counts, dtype=float)
    n_units = counts.shape[0]
    per_unit = counts.sum(axis=1)
    if n_units == 0 or not np.all(per_unit == per_unit[0]) or per_unit[0] < 2:
        return math.nan
    n = per_unit[0]
    p_i = ((counts * counts).sum(axis=1) - n) / (n * (n - 1))
    p_bar = p_i.mean()
    p_j = counts.sum(axis=0) / (n_units * n)
    p_e = float((p_j * p_j).sum())
    if p_e == 1.0:
        return math.nan
    return float((p_bar - p_e) / (1 - p_e))


def krippendorff_alpha(data: Sequence[Sequence[float | None]], level: str = "ordinal") -> float:
    """Krippendorff's alpha for a raters x units table (None/NaN = missing).

    level: "nominal", "ordinal" (ranks, via the marginal-sum metric) or "interval".
    Units with fewer than two values are not pairable and are ignored.
    """
    table = np.array([[np.nan if v is None else float(v) for v in row] for row in data], dtype=float)
    values = np.unique(table[~np.isnan(table)])
    if values.size < 2:
        return math.nan
    index = {v: i for i, v in enumerate(values)}
    k = values.size
    coincidence = np.zeros((k, k))
    for unit in table.T:
        present = unit[~np.isnan(unit)]
        m = present.size
        if m < 2:
            continue
        codes = [index[v] for v in present]
        for a, b in itertools.permutations(range(m), 2):
            coincidence[codes[a], codes[b]] += 1.0 / (m - 1)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    if level == "nominal":
        delta = 1.0 - np.eye(k)
    elif level == "interval":
        delta = (values[:, None] - values[None, :]) ** 2
    elif level == "ordinal":
        delta = np.zeros((k, k))
        for c in range(k):
            for d in range(c, k):
                delta[c, d] = delta[d, c] = (n_c[c:d + 1].sum() - (n_c[c] + n_c[d]) / 2) ** 2
    else:
        raise ValueError(f"unknown level {level!r}; use nominal, ordinal or interval")
    observed = (coincidence * delta).sum()
    expected = (np.outer(n_c, n_c) * delta).sum() / (n - 1)
    if expected == 0:
        return math.nan
    return float(1.0 - observed / expected)


# --- the study analysis -----------------------------------------------------------------------------


def _order_groups(groups: set[str]) -> list[str]:
    return ([REAL] if REAL in groups else []) + sorted(g for g in groups if g != REAL)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def group_stats(rows: list[dict[str, Any]], seed: int = 0, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Per model and real controls: realism mean + image-cluster bootstrap CI, fraction judged real +
    Wilson CI (per rating),
    agreement of the reader's finding with the intended label."""
    out = []
    for group in _order_groups({r["model"] for r in rows}):
        g = [r for r in rows if r["model"] == group]
        rated = [r for r in g if r.get("realism") is not None]
        realism = [r["realism"] for r in rated]
        choices = [bool(r["judged_real"]) for r in g if r.get("judged_real") is not None]
        labelled = [r for r in g if r.get("finding") and r.get("intended_label")]
        decided = [r for r in labelled if r["finding"] != "unsure"]
        agree = sum(r["finding"] == r["intended_label"] for r in decided)
        out.append({
            "group": group,
            "source": REAL if group == REAL else "synthetic",
            "n_images": len({r["image_id"] for r in g}),
            "n_ratings": len(g),
            "realism_mean": float(np.mean(realism)) if realism else math.nan,
            "realism_sd": float(np.std(realism, ddof=1)) if len(realism) > 1 else math.nan,
            "realism_ci": cluster_bootstrap_ci(realism, [r["image_id"] for r in rated], n_boot=n_boot, seed=seed),
            "judged_real_fraction": sum(choices) / len(choices) if choices else math.nan,
            "judged_real_ci": wilson_ci(sum(choices), len(choices)),
            "n_choices": len(choices),
            "finding_n": len(labelled),
            "finding_unsure_fraction": (len(labelled) - len(decided)) / len(labelled) if labelled else math.nan,
            "finding_agreement": agree / len(decided) if decided else math.nan,
            "finding_agreement_ci": wilson_ci(agree, len(decided)),
        })
    return out


def reader_stats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each reader (and all pooled): accuracy, sensitivity for synthetic, specificity, AUC."""
    out = []
    readers = sorted({r["reader"] for r in rows})
    for reader in [*readers, "all"]:
        g = rows if reader == "all" else [r for r in rows if r["reader"] == reader]
        chosen = [r for r in g if r.get("judged_real") is not None]
        correct = [(r["judged_real"] == (r["source"] == REAL)) for r in chosen]
        syn = [r for r in chosen if r["source"] != REAL]
        real = [r for r in chosen if r["source"] == REAL]
        scores = [(r, suspicion(r)) for r in g]
        scores = [(r, s) for r, s in scores if s is not None]
        rea = [r for r in g if r.get("realism") is not None]
        out.append({
            "reader": reader,
            "n": len(g),
            "accuracy": sum(correct) / len(correct) if correct else math.nan,
            "accuracy_ci": wilson_ci(sum(correct), len(correct)),
            "sensitivity_synthetic": sum(not r["judged_real"] for r in syn) / len(syn) if syn else math.nan,
            "specificity_real": sum(bool(r["judged_real"]) for r in real) / len(real) if real else math.nan,
            "auc": auc([s for r, s in scores if r["source"] != REAL], [s for r, s in scores if r["source"] == REAL]),
            "auc_realism": auc([-r["realism"] for r in rea if r["source"] != REAL],
                               [-r["realism"] for r in rea if r["source"] == REAL]),
            "mean_seconds": (float(np.mean([r["client_ms"] for r in g if r.get("client_ms") is not None])) / 1000
                             if any(r.get("client_ms") is not None for r in g) else math.nan),
        })
    return out


def inter_reader(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement between readers on the same images: Fleiss' kappa (images every reader rated)
    and Krippendorff's alpha (all images, missing ratings allowed)."""
    readers = sorted({r["reader"] for r in rows})
    images = sorted({r["image_id"] for r in rows})
    out: dict[str, Any] = {"n_readers": len(readers), "n_images": len(images)}
    for field, categories, level in (("realism", [1, 2, 3, 4, 5], "ordinal"), ("judged_real", [False, True], "nominal")):
        cell = {(r["reader"], r["image_id"]): r[field] for r in rows if r.get(field) is not None}
        if not cell:
            continue
        full = [i for i in images if all((rd, i) in cell for rd in readers)]
        counts = np.array([[sum(cell[(rd, i)] == c for rd in readers) for c in categories] for i in full])
        table = [[None if (rd, i) not in cell else float(cell[(rd, i)]) for i in images] for rd in readers]
        out[field] = {
            "fleiss_kappa": fleiss_kappa(counts) if len(full) else math.nan,
            "fleiss_n_images": len(full),
            f"krippendorff_alpha_{level}": krippendorff_alpha(table, level) if len(readers) > 1 else math.nan,
        }
    return out


def intra_reader(all_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Consistency of each reader with themselves on repeated images."""
    by_pos = {(r["reader"], r["position"]): r for r in all_rows}
    pairs = [(by_pos[(r["reader"], r["repeat_of_position"])], r) for r in all_rows
             if r.get("repeat_of_position") not in (None, "") and (r["reader"], r["repeat_of_position"]) in by_pos]

    def summary(ps: list[tuple[dict, dict]]) -> dict[str, Any]:
        rp = [(a["realism"], b["realism"]) for a, b in ps if a.get("realism") is not None and b.get("realism") is not None]
        cp = [(a["judged_real"], b["judged_real"]) for a, b in ps
              if a.get("judged_real") is not None and b.get("judged_real") is not None]
        return {
            "n_pairs": len(ps),
            "realism_exact_agreement": float(np.mean([a == b for a, b in rp])) if rp else math.nan,
            "realism_within_one": float(np.mean([abs(a - b) <= 1 for a, b in rp])) if rp else math.nan,
            "realism_mean_abs_diff": float(np.mean([abs(a - b) for a, b in rp])) if rp else math.nan,
            "realism_alpha_ordinal": krippendorff_alpha([[a for a, _ in rp], [b for _, b in rp]], "ordinal") if rp else math.nan,
            "choice_agreement": float(np.mean([a == b for a, b in cp])) if cp else math.nan,
        }

    result = {"all": summary(pairs)}
    for reader in sorted({a["reader"] for a, _ in pairs}):
        result[reader] = summary([(a, b) for a, b in pairs if a["reader"] == reader])
    return result


def pairwise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of groups: two-sided Mann-Whitney U on realism, Holm-corrected across pairs."""
    from scipy.stats import mannwhitneyu

    groups = _order_groups({r["model"] for r in rows})
    values = {g: [r["realism"] for r in rows if r["model"] == g and r.get("realism") is not None] for g in groups}
    out = []
    for a, b in itertools.combinations(groups, 2):
        x, y = values[a], values[b]
        if len(x) == 0 or len(y) == 0:
            continue
        if len(set(x) | set(y)) == 1:
            u, p = len(x) * len(y) / 2, 1.0  # all ratings equal: no evidence of a difference
        else:
            res = mannwhitneyu(x, y, alternative="two-sided")
            u, p = float(res.statistic), float(res.pvalue)
        out.append({"group_a": a, "group_b": b, "n_a": len(x), "n_b": len(y), "mean_a": float(np.mean(x)),
                    "mean_b": float(np.mean(y)), "u": u, "effect_auc": u / (len(x) * len(y)), "p": p})
    for row, adj in zip(out, holm([r["p"] for r in out]), strict=True):
        row["p_holm"] = adj
        row["significant_0.05"] = adj < 0.05
    return out


def reader_by_group(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean realism of each reader for each group (the heatmap)."""
    acc: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        if r.get("realism") is not None:
            acc[(r["reader"], r["model"])].append(r["realism"])
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (reader, group), vals in acc.items():
        out[reader][group] = float(np.mean(vals))
    return dict(out)


def paired_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired (2AFC) design: proportion of pairs where the synthetic image was picked, per model and
    per reader, with Wilson CIs (0.5 = readers cannot tell), and the share of 'left' answers."""
    out: dict[str, Any] = {"models": [], "readers": []}
    for key, label in (("model", "models"), ("reader", "readers")):
        for value in sorted({r[key] for r in rows}):
            g = [bool(r["correct"]) for r in rows if r[key] == value]
            out[label].append({key: value, "n": len(g), "correct": sum(g) / len(g), "ci": wilson_ci(sum(g), len(g)),
                               "picked_left": sum(r["picked"] == "left" for r in rows if r[key] == value) / len(g)})
    return out


def analyze(all_rows: list[dict[str, Any]], seed: int = 0, n_boot: int = 2000, delta: float = 0.05) -> dict[str, Any]:
    """The whole analysis of one study's answers (first showings; repeats only for intra-reader).
    Calibration answers (given with feedback) are left out of everything."""
    from synthcxr.study.inference import mrmc_summary, realism_mixed_model, time_analysis

    main = [r for r in all_rows if r.get("phase") in (None, "", "main")]
    rows = [r for r in main if r.get("repeat_of_position") in (None, "")]
    paired = [r for r in rows if r.get("design") == "paired"]
    single = [r for r in rows if r.get("design") != "paired"]
    result: dict[str, Any] = {
        "n_answers": len(all_rows),
        "n_calibration": len(all_rows) - len(main),
        "n_first_showings": len(rows),
        "design": "paired" if paired else "single",
        "groups": group_stats(single, seed=seed, n_boot=n_boot),
        "readers": reader_stats(single),
        "inter_reader": inter_reader(single),
        "intra_reader": intra_reader([r for r in main if r.get("design") != "paired"]),
        "pairwise": pairwise(single),
        "reader_by_group": reader_by_group(single),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "resampled_unit": "image", "level": 0.95},
        "mrmc": mrmc_summary(rows, delta=delta),
        "time": time_analysis(rows),
        "mixed_model": realism_mixed_model(single),
    }
    if paired:
        result["paired"] = paired_stats(paired)
    return _nan_to_none(result)


# --- outputs ------------------------------------------------------------------------------------------


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        atomic_write_text(path, "")
        return
    flat = []
    for r in rows:
        item = {}
        for k, v in r.items():
            if isinstance(v, list | tuple) and len(v) == 2:
                item[f"{k}_low"], item[f"{k}_high"] = v
            else:
                item[k] = v
        flat.append(item)
    atomic_write_text(path, csv_text(flat, list(flat[0])))


def write_outputs(result: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """analysis.json, groups/readers/pairwise CSVs and two plots in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_json(out_dir / "analysis.json", result)]
    for name in ("groups", "readers", "pairwise"):
        _csv(out_dir / f"{name}.csv", result[name])
        written.append(out_dir / f"{name}.csv")

    groups = [g for g in result["groups"] if g["realism_mean"] is not None]
    if groups:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 2), 4))
        means = [g["realism_mean"] for g in groups]
        lows = [g["realism_mean"] - g["realism_ci"][0] for g in groups]
        highs = [g["realism_ci"][1] - g["realism_mean"] for g in groups]
        colors = ["#4c72b0" if g["group"] == REAL else "#dd8452" for g in groups]
        ax.bar(range(len(groups)), means, yerr=[lows, highs], capsize=5, color=colors)
        ax.set_xticks(range(len(groups)), [g["group"] for g in groups], rotation=20, ha="right")
        ax.set_ylim(1, 5)
        ax.set_ylabel("mean realism (1-5), 95% bootstrap CI")
        ax.set_title("Realism by model (real = controls)")
        fig.tight_layout()
        fig.savefig(out_dir / "realism_by_model.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "realism_by_model.png")

    mrmc = result.get("mrmc") or {}
    plotted = [m for m in mrmc.get("models", []) if m.get("auc") is not None and None not in (m.get("ci") or [None])]
    if mrmc.get("models"):
        _csv(out_dir / "mrmc.csv", [{k: v for k, v in m.items() if k != "per_reader"} for m in mrmc["models"]])
        written.append(out_dir / "mrmc.csv")
    if plotted:  # models with an estimate and a CI (one reader's first answers may give neither)
        models = plotted
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(models) + 2), 4))
        delta = mrmc["delta"]
        ax.axhspan(0.5 - delta, 0.5 + delta, color="#cccccc", alpha=0.6, label=f"0.5 +- {delta} (equivalence margin)")
        ax.axhline(0.5, color="#555555", lw=1)
        for k, m in enumerate(models):
            lo, hi = m["ci"]
            ax.errorbar([k], [m["auc"]], yerr=[[m["auc"] - lo], [hi - m["auc"]]], fmt="o", capsize=6,
                        color="#2ca02c" if m["equivalent"] else "#dd8452")
        ax.set_xticks(range(len(models)), [m["model"] for m in models], rotation=20, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("readers' AUC for telling it from real\n(OR 95% CI; 0.5 = indistinguishable)")
        ax.set_title("MRMC: random readers and cases")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "mrmc_auc.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "mrmc_auc.png")

    heat = result["reader_by_group"]
    if heat:
        readers = sorted(heat)
        names = [g["group"] for g in result["groups"]]
        matrix = np.array([[heat[r].get(g, np.nan) for g in names] for r in readers], dtype=float)
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), max(3.0, 0.5 * len(readers) + 1.5)))
        im = ax.imshow(matrix, cmap="viridis", vmin=1, vmax=5, aspect="auto")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_yticks(range(len(readers)), readers)
        for (i, j), v in np.ndenumerate(matrix):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 3.5 else "black", fontsize=8)
        fig.colorbar(im, ax=ax, label="mean realism")
        ax.set_title("Mean realism: reader x model")
        fig.tight_layout()
        fig.savefig(out_dir / "reader_model_heatmap.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "reader_model_heatmap.png")
    return written
