"""Load test of the reader-study server on loopback: N concurrent readers x M answers each.

Each simulated reader signs in with their invite link, then repeats GET /read -> POST answer, like
a browser; every 10th answer is submitted twice (a double click) to prove idempotency. Afterwards
the database must hold exactly N x M answers, one per task. Prints answers/s and latency
percentiles. Everything runs on 127.0.0.1 and stops by itself (bounded loops, per-request timeouts).

    python benchmarks/study_load.py                  # 20 readers x 50 answers (the reference run)
    python benchmarks/study_load.py --readers 4 --answers 10
    python benchmarks/study_load.py --design paired  # 20 readers x 50 pairs ("which one is synthetic?")
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
TASK_RE = re.compile(r'action="/read/answer/([^"]+)"')


def _make_images(root: Path, n_real: int, n_model: int) -> tuple[Path, Path]:
    """Small generated 'real' and 'synthetic' folders (the synthetic one with a manifest.jsonl)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    real, model = root / "real", root / "model"
    real.mkdir(parents=True)
    model.mkdir(parents=True)
    for i in range(n_real):
        Image.fromarray(rng.integers(0, 255, (80, 64), dtype=np.uint8)).save(real / f"CHNCXR_{i:04d}_{i % 2}.png")
    rows = []
    for i in range(n_model):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(model / f"{i:05d}.png")
        rows.append(json.dumps({"file": f"{i:05d}.png", "prompt": "chest x-ray", "seed": i, "model": "m", "label": "normal"}))
    (model / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return real, model


def _reader(base: str, invite: str, answers: int, barrier: threading.Barrier, out: dict[str, Any],
            design: str = "single") -> None:
    import httpx

    latencies, cycles, duplicates = [], [], 0
    try:
        with httpx.Client(base_url=base, timeout=30.0, follow_redirects=False) as client:
            path = invite.split(base, 1)[-1] if invite.startswith(base) else "/" + invite.split("/", 3)[-1]
            page = client.get(path)
            client.post(path, data={"csrf_token": CSRF_RE.search(page.text).group(1)})
            barrier.wait(timeout=60)
            for i in range(answers):
                t0 = time.perf_counter()
                page = client.get("/read").text
                task = TASK_RE.search(page).group(1)
                data = {"csrf_token": CSRF_RE.search(page).group(1), "realism": str(1 + i % 5),
                        "choice": "real" if i % 2 else "synthetic", "confidence": "2", "elapsed_ms": "1500"}
                if design == "paired":
                    data = {"csrf_token": data["csrf_token"], "picked": "left" if i % 2 else "right",
                            "confidence": "2", "elapsed_ms": "1500"}
                t1 = time.perf_counter()
                resp = client.post(f"/read/answer/{task}", data=data)
                t2 = time.perf_counter()
                if resp.status_code != 303:
                    raise RuntimeError(f"answer {i}: HTTP {resp.status_code}")
                latencies.append(t2 - t1)
                cycles.append(t2 - t0)
                if i % 10 == 9:  # a double click: must not create a second answer
                    if client.post(f"/read/answer/{task}", data=data).status_code != 303:
                        raise RuntimeError("double submit was not accepted idempotently")
                    duplicates += 1
    except Exception as exc:  # noqa: BLE001 - reported to the caller, who fails the run
        out["error"] = f"{type(exc).__name__}: {exc}"
    out.update(latencies=latencies, cycles=cycles, duplicates=duplicates)


def run_load(readers: int = 20, answers: int = 50, workdir: Path | None = None, db_url: str | None = None,
             design: str = "single") -> dict[str, Any]:
    """Create a study with `answers` images (paired: `answers` pairs), serve it on loopback, run the
    readers, check the DB.

    `db_url`: an empty database to use instead of a new SQLite file (e.g. PostgreSQL)."""
    from sqlalchemy import func, select

    from synthcxr.study.db import Answer, Task, session_scope
    from synthcxr.study.server import background_server
    from synthcxr.study.service import create_study
    from synthcxr.study.settings import StudySettings

    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(tmp.name) if tmp else Path(workdir)
    try:
        n_real = answers if design == "paired" else answers // 2
        real, model = _make_images(root / "src", n_real, answers if design == "paired" else answers - n_real)
        db_url = db_url or f"sqlite:///{root / 'load.sqlite3'}"
        created = create_study(db_url, "load", real=real, models=[model], per_model=None, real_count=None,
                               readers=readers, seed=0, image_size=64, study_dir=root / "study",
                               base_url="http://127.0.0.1", design=design)
        results: list[dict[str, Any]] = [{} for _ in range(readers)]
        barrier = threading.Barrier(readers + 1)
        with background_server(StudySettings(db=db_url, dir=root / "study")) as base:
            threads = [threading.Thread(target=_reader, args=(base, link, answers, barrier, results[n], design),
                                        daemon=True)
                       for n, link in enumerate(created.invites.values())]
            for t in threads:
                t.start()
            barrier.wait(timeout=120)
            start = time.perf_counter()
            for t in threads:
                t.join(timeout=600)
            wall = time.perf_counter() - start
        errors = [r["error"] for r in results if "error" in r]
        with session_scope(db_url) as s:
            stored = s.scalar(select(func.count()).select_from(Answer))
            distinct = s.scalar(select(func.count(func.distinct(Answer.task_id))))
            per_reader = [n for (n,) in s.execute(
                select(func.count()).select_from(Answer).join(Task, Answer.task_id == Task.id).group_by(Task.reader_id))]
        lat = np.array([x for r in results for x in r.get("latencies", [])])
        cyc = np.array([x for r in results for x in r.get("cycles", [])])
        return {
            "readers": readers, "answers_per_reader": answers, "expected": readers * answers,
            "stored": stored, "distinct_tasks": distinct, "per_reader_min": min(per_reader, default=0),
            "per_reader_max": max(per_reader, default=0),
            "double_submits": sum(r.get("duplicates", 0) for r in results), "errors": errors,
            "wall_s": wall, "answers_per_s": len(lat) / wall if wall else 0.0,
            "post_p50_ms": float(np.percentile(lat, 50) * 1000) if lat.size else None,
            "post_p95_ms": float(np.percentile(lat, 95) * 1000) if lat.size else None,
            "cycle_p95_ms": float(np.percentile(cyc, 95) * 1000) if cyc.size else None,
        }
    finally:
        if tmp:
            tmp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--answers", type=int, default=50, help="answers per reader")
    parser.add_argument("--db", default=None, help="an empty database URL (default: a new SQLite file)")
    parser.add_argument("--design", default="single", choices=["single", "paired"])
    args = parser.parse_args()
    import logging

    logging.getLogger("synthcxr").setLevel(logging.WARNING)
    r = run_load(args.readers, args.answers, db_url=args.db, design=args.design)
    ok = not r["errors"] and r["stored"] == r["expected"] == r["distinct_tasks"]
    backend = (args.db or "sqlite").split(":")[0]
    print(f"{r['readers']} readers x {r['answers_per_reader']} answers ({args.design} design) on 127.0.0.1 "
          f"({backend}, one uvicorn worker)")
    print(f"stored answers: {r['stored']} (expected {r['expected']}, distinct tasks {r['distinct_tasks']}, "
          f"{r['double_submits']} double submits ignored)")
    print(f"throughput: {r['answers_per_s']:.1f} answers/s over {r['wall_s']:.1f} s")
    print(f"answer POST latency: p50 {r['post_p50_ms']:.0f} ms, p95 {r['post_p95_ms']:.0f} ms; "
          f"GET+POST cycle p95 {r['cycle_p95_ms']:.0f} ms")
    if r["errors"]:
        print("errors:", *r["errors"][:5], sep="\n  ")
    print("OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
