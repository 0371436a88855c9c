"""Reader-study service layer: everything the CLI, the web app and other stages need, without HTTP.

`create_study` -> invite links; `simulate_answers` (demo); `export_ratings` -> CSV;
`analyze_study` -> statistics + plots; `study_status` -> progress per reader.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import random
import re
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from synthcxr.errors import StudyError
from synthcxr.fileio import atomic_write_bytes, atomic_write_text, sha256_bytes
from synthcxr.logging_utils import get_logger, progress_bar
from synthcxr.study import db
from synthcxr.study.csvsafe import csv_text
from synthcxr.study.db import AdminToken, Answer, Image, Reader, Study, Task, session_scope
from synthcxr.study.designs import (
    balanced_sides,
    block_order,
    check_design,
    make_pairs,
    split_real_into_blocks,
)
from synthcxr.study.images import SourceImage, blind, collect_model, collect_real, dither_png, source_size
from synthcxr.study.questions import AnswerInput, QuestionsConfig
from synthcxr.study.security import database_secret, hash_token, new_token, opaque_id

log = get_logger(__name__)

REAL_GROUP = "real"
_upgraded: set[str] = set()


def ensure_db(db_url: str) -> None:
    """Run the migrations once per process per database."""
    if db_url not in _upgraded:
        db.upgrade(db_url)
        _upgraded.add(db_url)


def configured_secret() -> str | None:
    from synthcxr.study.settings import load_settings

    return load_settings().secret


def secret_for(session: Session) -> str:
    return database_secret(session, configured_secret())


def invite_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/invite/{token}"


@dataclass
class CreatedStudy:
    """What `create_study` hands back: one one-time invite link per reader (shown only now)."""

    name: str
    invites: dict[str, str]
    n_images: int
    n_tasks_per_reader: int
    image_dir: Path
    admin_token: str | None = None
    groups: dict[str, int] = field(default_factory=dict)
    blinding: dict[str, Any] = field(default_factory=dict)
    """Study size, each group's source sizes and framing, and the leak check (also stored in the study)."""
    warnings: list[str] = field(default_factory=list)


# --- creating a study ---------------------------------------------------------------------------


def _parse_models(models: Iterable[str | Path | tuple[str, str | Path]]) -> list[tuple[str, Path]]:
    """`runs/lora_adamw` -> ("lora_adamw", path); `name=path` and (name, path) set the name."""
    parsed: list[tuple[str, Path]] = []
    for item in models:
        if isinstance(item, tuple):
            name, path = item[0], Path(item[1])
        else:
            text = str(item)
            if "=" in text and not Path(text).exists():
                name, _, raw = text.partition("=")
                path = Path(raw)
            else:
                path = Path(text)
                name = path.resolve().name
        parsed.append((name, path))
    names = [n for n, _ in parsed]
    for name in names:
        if name == REAL_GROUP:
            raise StudyError("a model may not be called 'real' (that group holds the real controls)",
                             fix="name it with --model othername=PATH")
        if names.count(name) > 1:
            raise StudyError(f"two models are both called {name!r}", fix="name them with --model NAME=PATH")
    return parsed


def _sample(images: list[SourceImage], k: int | None, rng: random.Random, what: str, where: Path) -> list[SourceImage]:
    if k is None:
        return list(images)
    if k > len(images):
        raise StudyError(f"{what} has only {len(images)} images, {k} requested", file=where,
                         fix="lower --per-model / --real-count or generate more images")
    return rng.sample(images, k)


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not slug:
        raise StudyError(f"study name {name!r} has no usable characters", fix="use letters, digits, - or _")
    return slug


def check_name(kind: str, name: str) -> str:
    """Study and reader names appear in admin URLs: refuse '/' and '\\' (a path separator even when
    escaped), control characters and blank names, with the fix."""
    bad = [c for c in ("/", "\\") if c in name]
    if bad:
        raise StudyError(f"{kind} name {name!r} contains {bad[0]!r}, which admin page links cannot carry",
                         fix=f"choose a {kind} name without '/' or '\\' (e.g. {name.replace('/', '-').replace(chr(92), '-')!r})")
    if not name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > 200:
        raise StudyError(f"{kind} name {name!r} is empty, too long (> 200) or contains control characters",
                         fix=f"choose a {kind} name of printable characters")
    return name


def new_order_key() -> str:
    """A study's secret for reading orders: 256 random bits from the OS (`secrets`)."""
    return secrets.token_hex(32)


def _keyed(order_key: str, purpose: str) -> bytes:
    return hmac.new(order_key.encode(), purpose.encode(), hashlib.sha256).digest()


def _reading_order(image_ids: Sequence[str], order_key: str, reader_name: str, repeats: int,
                   blocks: Sequence[tuple[str, Sequence[str]]] | None = None) -> list[tuple[str, int | None]]:
    """Random order for one reader; repeats re-show `repeats` images later on.

    The order is drawn from HMAC(study's secret key, reader name): the key is random per study and
    never leaves the database, so knowing the code, the seed and the reader's name predicts nothing
    (the old `Random(f"{seed}:{reader}")` gave away real vs synthetic at every position). It is
    drawn once, stored as task positions, and read back from there ever after.

    Returns (image_id, index of the original in the list or None). A repeat is placed at least a
    few images after its original so it is not recognised from short-term memory. With `blocks`
    ((name, image ids) in the reader's block order) each block is shuffled on its own.
    """
    rng = random.Random(int.from_bytes(_keyed(order_key, "order:" + reader_name), "big"))
    if blocks is None:
        order: list[tuple[str, int | None]] = [(i, None) for i in image_ids]
        rng.shuffle(order)
    else:
        order = []
        for _, ids in blocks:
            part = [(i, None) for i in sorted(ids)]
            rng.shuffle(part)
            order += part
    if repeats:
        ids = [i for i, _ in order]
        gap = max(1, min(5, len(ids) // 3))
        # repeat images shown early enough that the repeat can come `gap` or more images later
        early, late = ids[:max(0, len(ids) - gap)], ids[max(0, len(ids) - gap):]
        picked = rng.sample(early, min(repeats, len(early)))
        picked += rng.sample(late, min(repeats - len(picked), len(late)))
        for image_id in picked:
            first = next(n for n, (i, rep) in enumerate(order) if i == image_id and rep is None)
            pos = rng.randint(min(first + 1 + gap, len(order)), len(order))
            order.insert(pos, (image_id, -1))
        # resolve "-1" into the index of the original after all inserts
        firsts = {i: n for n, (i, rep) in enumerate(order) if rep is None}
        order = [(i, firsts[i] if rep is not None else None) for i, rep in order]
    return order


def task_image(task: Task, side: str = "left") -> bytes:
    """The file served for one task: the blinded image with this task's own dither (`dither_png`),
    drawn from the study's secret, so it is the same on every request but differs between tasks.
    `side="right"`: the right image of a pair (its own dither)."""
    image = task.image2 if side == "right" else task.image
    if image is None:
        raise StudyError("this task shows one image only")
    data = (Path(image.study.image_dir) / f"{image.id}.png").read_bytes()
    purpose = "dither:" + task.public_id + (":right" if side == "right" else "")
    return dither_png(data, _keyed(image.study.order_key or "", purpose))


def feedback(task: Task) -> dict[str, Any]:
    """What a reader is told after answering a calibration task: the truth (and the model) and
    whether their answer was right. Only ever for calibration tasks."""
    if task.phase != "calibration" or task.answer is None:
        raise StudyError("feedback is given for answered calibration images only")
    answer = task.answer
    if task.image2 is not None:
        synthetic = task.image2 if task.image.source == REAL_GROUP else task.image
        side = "left" if synthetic is task.image else "right"
        return {"paired": True, "synthetic_side": side, "model": synthetic.model, "correct": answer.picked == side}
    image = task.image
    out: dict[str, Any] = {"paired": False, "source": image.source,
                           "model": image.model if image.source != REAL_GROUP else None, "correct": None}
    if answer.judged_real is not None:
        out["correct"] = answer.judged_real == (image.source == REAL_GROUP)
    return out


def _add_reader(session: Session, study: Study, reader_name: str, secret: str) -> str:
    """Create a reader with their own order of tasks; returns the invite token (stored hashed)."""
    check_name("reader", reader_name)
    if session.scalar(select(Reader).where(Reader.study_id == study.id, Reader.name == reader_name)):
        raise StudyError(f"study {study.name!r} already has a reader called {reader_name!r}",
                         fix="choose another --reader-name, or `study reissue` to give them a new link")
    token = new_token()
    reader = Reader(study_id=study.id, name=reader_name, invite_hash=hash_token(secret, "invite:" + token))
    session.add(reader)
    session.flush()
    if study.order_key is None:
        study.order_key = new_order_key()
    reader_index = session.scalar(select(func.count()).select_from(Reader).where(Reader.study_id == study.id)) - 1
    tasks = _calibration_tasks(session, study, reader, reader_name)
    if study.design == "paired":
        tasks += _paired_tasks(study, reader, reader_name, reader_index, start=len(tasks))
        session.add_all(tasks)
        return token
    images = session.execute(select(Image.id, Image.model, Image.original_path, Image.source)
                             .where(Image.study_id == study.id, Image.role == "study"))
    rows = sorted(images, key=lambda row: (row[1], row[2]))
    blocks = None
    models = sorted({m for _, m, _, src in rows if src != REAL_GROUP})
    if (study.options or {}).get("counterbalance") and len(models) > 1:
        real_share = split_real_into_blocks([i for i, _, _, src in rows if src == REAL_GROUP], models,
                                            random.Random(_keyed(study.order_key, "real-blocks")))
        blocks = [(m, [i for i, model, _, src in rows if model == m and src != REAL_GROUP] + real_share[m])
                  for m in block_order(models, reader_index)]
    order = _reading_order([i for i, *_ in rows], study.order_key, reader_name, study.repeats, blocks)
    block_of = {i: b for b, ids in (blocks or []) for i in ids}
    start = len(tasks)
    main = [Task(public_id=opaque_id(), reader_id=reader.id, image_id=i, position=start + n, block=block_of.get(i))
            for n, (i, _) in enumerate(order)]
    session.add_all(tasks + main)
    session.flush()
    for task, (_, original) in zip(main, order, strict=True):
        if original is not None:
            task.repeat_of = main[original].id
    return token


def _calibration_tasks(session: Session, study: Study, reader: Reader, reader_name: str) -> list[Task]:
    """The calibration block, first: single images, or pairs in a paired study, in a secret order."""
    rng = random.Random(int.from_bytes(_keyed(study.order_key, "calibration:" + reader_name), "big"))
    if study.design == "paired":
        pairs = list((study.options or {}).get("calibration_pairs", []))
        rng.shuffle(pairs)
        sides = balanced_sides(len(pairs), rng)
        return [_pair_task(reader, p, left, n, "calibration") for n, (p, left) in enumerate(zip(pairs, sides, strict=True))]
    ids = sorted(session.scalars(select(Image.id).where(Image.study_id == study.id, Image.role == "calibration")))
    rng.shuffle(ids)
    return [Task(public_id=opaque_id(), reader_id=reader.id, image_id=i, position=n, phase="calibration")
            for n, i in enumerate(ids)]


def _pair_task(reader: Reader, pair: dict[str, Any], synthetic_left: bool, position: int, phase: str) -> Task:
    left, right = (pair["synthetic"], pair["real"]) if synthetic_left else (pair["real"], pair["synthetic"])
    return Task(public_id=opaque_id(), reader_id=reader.id, image_id=left, image2_id=right, position=position,
                phase=phase, block=pair["model"] if phase == "main" else None)


def _paired_tasks(study: Study, reader: Reader, reader_name: str, reader_index: int, start: int) -> list[Task]:
    """Every pair once, the synthetic image left in exactly half of them (drawn from the secret);
    in model blocks ordered by the Latin square when counterbalanced."""
    options = study.options or {}
    pairs = list(options.get("pairs", []))
    rng = random.Random(int.from_bytes(_keyed(study.order_key, "pairs:" + reader_name), "big"))
    models = sorted({p["model"] for p in pairs})
    if options.get("counterbalance") and len(models) > 1:
        ordered = []
        for model in block_order(models, reader_index):
            block = [p for p in pairs if p["model"] == model]
            rng.shuffle(block)
            ordered += block
        pairs = ordered
    else:
        rng.shuffle(pairs)
    sides = balanced_sides(len(pairs), rng)
    return [_pair_task(reader, p, left, start + n, "main") for n, (p, left) in enumerate(zip(pairs, sides, strict=True))]


def admin_token_days() -> float:
    """How long admin tokens stay valid (`SYNTHCXR_STUDY_ADMIN_TOKEN_DAYS`, default 7)."""
    from synthcxr.study.settings import load_settings

    return load_settings().admin_token_days


def admin_token_expires(token: AdminToken, valid_days: float) -> dt.datetime:
    """Expiry is computed from the creation time, so changing the setting applies to every token."""
    return token.created_at + dt.timedelta(days=valid_days)


def _active_admin_tokens(session: Session, valid_days: float) -> list[AdminToken]:
    cutoff = db.utcnow() - dt.timedelta(days=valid_days)
    return list(session.scalars(select(AdminToken).where(AdminToken.revoked.is_(False), AdminToken.created_at > cutoff)
                                .order_by(AdminToken.created_at)))


def active_admin_token_expiry(db_url: str, valid_days: float | None = None) -> dt.datetime | None:
    """When the last still-valid admin token expires (UTC), or None when no token is valid."""
    ensure_db(db_url)
    days = admin_token_days() if valid_days is None else valid_days
    with session_scope(db_url) as session:
        active = _active_admin_tokens(session, days)
        return admin_token_expires(active[-1], days) if active else None


def _revoke_admin(session: Session) -> int:
    """Revoke every admin token and end every admin browser session; returns the tokens revoked."""
    revoked = session.execute(update(AdminToken).where(AdminToken.revoked.is_(False)).values(revoked=True)).rowcount
    session.execute(delete(db.WebSession).where(db.WebSession.is_admin.is_(True)))
    return revoked


def new_admin_token(db_url: str, revoke_old: bool = False) -> str:
    """A new admin sign-in token (stored only as a keyed hash). With `revoke_old`, every older token
    and every signed-in admin session stops working in the same transaction."""
    ensure_db(db_url)
    token = new_token()
    with session_scope(db_url) as session:
        if revoke_old:
            n = _revoke_admin(session)
            log.info("revoked %d older admin token(s)", n)
        session.add(AdminToken(token_hash=hash_token(secret_for(session), "admin:" + token)))
    return token


def revoke_admin_tokens(db_url: str) -> int:
    """Revoke every admin token and admin session (a leaked token is useless afterwards)."""
    ensure_db(db_url)
    with session_scope(db_url) as session:
        return _revoke_admin(session)


def serve_admin_token(db_url: str, *, new: bool = False, revoke_old: bool = False,
                      valid_days: float | None = None) -> str | None:
    """What `study serve` prints: a new token only when none is valid or one is asked for."""
    if new or revoke_old or active_admin_token_expiry(db_url, valid_days) is None:
        return new_admin_token(db_url, revoke_old=revoke_old)
    return None


MAX_AUTO_SIZE = 512
PAD_BAR_FRACTION = 0.02  # a uniform band this wide (fraction of the side) at an edge counts as padding


def _geometry(chosen: Sequence[SourceImage]) -> list[tuple[int, int]]:
    """(width, height) of every chosen image, from file headers only (fast, before any work)."""
    with progress_bar(len(chosen), "reading image sizes") as (bar, task):
        sizes = []
        for src in chosen:
            sizes.append(source_size(src.path))
            bar.advance(task)
    return sizes


def _group_framing(chosen: Sequence[SourceImage], sizes: Sequence[tuple[int, int]], bars: Sequence[float],
                   image_size: int) -> dict[str, dict[str, Any]]:
    """Per group: how many images, their source sizes, and what the pipeline had to do to them."""
    from collections import Counter

    out: dict[str, dict[str, Any]] = {}
    for group in sorted({src.group for src in chosen}):
        idx = [n for n, src in enumerate(chosen) if src.group == group]
        dims = [sizes[n] for n in idx]
        counts = Counter(f"{w}x{h}" for w, h in dims)
        out[group] = {
            "n": len(idx),
            "sizes": dict(counts.most_common(5)),
            "distinct_sizes": len(counts),
            "smallest_side": min(min(d) for d in dims),
            "largest_side": max(min(d) for d in dims),
            "cropped": sum(w != h for w, h in dims),  # centre-cropped to a square
            "enlarged": sum(min(d) < image_size for d in dims),
            "padded": sum(bars[n] >= PAD_BAR_FRACTION for n in idx),
        }
    return out


def _check_enlargement(chosen: Sequence[SourceImage], sizes: Sequence[tuple[int, int]], image_size: int,
                       allow_enlarge: bool) -> list[str]:
    """Refuse (or, with `allow_enlarge`, warn about) images smaller than the study size."""
    small: dict[str, list[tuple[int, int]]] = {}
    for src, (w, h) in zip(chosen, sizes, strict=True):
        if min(w, h) < image_size:
            small.setdefault(src.group, []).append((w, h))
    if not small:
        return []
    n_by_group = {g: sum(src.group == g for src in chosen) for g in small}
    parts = []
    for group, dims in sorted(small.items()):
        w, h = min(dims, key=min)
        parts.append(f"{len(dims)} of {n_by_group[group]} images of {group!r} (smallest {w}x{h})")
    what = (f"{'; '.join(parts)} are smaller than the study size of {image_size} px and would be enlarged: "
            "enlarged images are blurrier and compress differently, which lets readers tell the groups apart")
    if not allow_enlarge:
        smallest = max(16, min(min(d) for d in sizes))  # 16 px: the smallest study size there is
        raise StudyError(what, fix=f"use --image-size {smallest} (the smallest side of all images), bring larger "
                                   "images, or pass --allow-enlarge to enlarge anyway (then a warning is printed "
                                   "and the leak check measures the effect)")
    return [what + " (--allow-enlarge)"]


def create_study(
    db_url: str,
    name: str,
    real: str | Path | Sequence[str | Path] | None = None,
    models: Sequence[str | Path | tuple[str, str | Path]] = (),
    per_model: int | None = 30,
    real_count: int | None = 30,
    readers: int | Sequence[str] = 3,
    seed: int = 0,
    questions: QuestionsConfig | dict[str, Any] | None = None,
    repeats: int = 0,
    image_size: int | None = None,
    study_dir: str | Path | None = None,
    base_url: str = "http://127.0.0.1:8000",
    allow_enlarge: bool = False,
    design: str = "single",
    calibration: int = 0,
    counterbalance: bool = False,
    max_image_size: int = MAX_AUTO_SIZE,
) -> CreatedStudy:
    """Blind and store the images, check them for leaks, create readers with secret random orders,
    return invite links.

    `real`: folder(s) of real control images; `models`: run directories or generation folders
    (with manifest.jsonl), optionally `name=path`; `per_model`/`real_count`: images sampled per
    group (None = all; `seed` decides which); `readers`: a count or a list of names; `repeats`:
    images shown twice to each reader (intra-reader agreement); `image_size`: side of the square
    images readers see (None = the smallest side of all chosen images, at most 512). Images smaller
    than `image_size` are refused unless `allow_enlarge` (then a warning); `max_image_size` caps the
    automatic size (1024 serves large sources at 1024 px; smaller ones are never enlarged).
    `design`: "single" or "paired" (each synthetic image beside a real one of the same label where
    known, "which one is synthetic?"); `calibration`: images (pairs) shown first with the right
    answer after each, drawn apart from the study images and never analysed; `counterbalance`:
    model blocks in a Latin-square order per reader.
    """
    from synthcxr.study.leakcheck import features, leak_check, warnings_for

    # 1. check inputs before touching anything
    q = questions if isinstance(questions, QuestionsConfig) else QuestionsConfig.model_validate(questions or {})
    check_name("study", name)
    if image_size is not None and not 16 <= image_size <= 4096:
        raise StudyError(f"image size {image_size} is out of range", fix="use --image-size between 16 and 4096")
    if repeats < 0:
        raise StudyError("repeats must be >= 0", fix="pass --repeats 0 or more")
    check_design(design)
    if design == "paired" and repeats:
        raise StudyError("repeats are for the single-image design", fix="drop --repeats or use --design single")
    if calibration < 0:
        raise StudyError("calibration must be >= 0", fix="pass --calibration 0 or more")
    if not 16 <= max_image_size <= 4096:
        raise StudyError(f"max image size {max_image_size} is out of range", fix="use --max-image-size between 16 and 4096")
    reader_names = [f"reader-{i + 1}" for i in range(readers)] if isinstance(readers, int) else list(readers)
    for reader_name in reader_names:
        check_name("reader", reader_name)
    if len(set(reader_names)) != len(reader_names):
        raise StudyError("reader names must be unique")
    ensure_db(db_url)
    with session_scope(db_url) as session:
        if session.scalar(select(Study).where(Study.name == name)):
            raise StudyError(f"a study called {name!r} already exists in this database",
                             fix="choose another --name (existing studies and their answers are kept)")

    # 2. collect and sample the images of every group
    rng = random.Random(seed)
    chosen: list[SourceImage] = []
    pools: dict[str, tuple[list[SourceImage], Path]] = {}
    real_paths = [] if real is None else [real] if isinstance(real, str | Path) else list(real)
    real_images = [img for p in real_paths for img in collect_real(Path(p))]
    if real_images:
        chosen += _sample(real_images, real_count, rng, "the real images", Path(real_paths[0]))
        pools[REAL_GROUP] = (real_images, Path(real_paths[0]))
    for group, path in _parse_models(models):
        images = collect_model(path, group)
        chosen += _sample(images, per_model, rng, f"model {group!r}", path)
        pools[group] = (images, path)
    if not chosen:
        raise StudyError("the study has no images", fix="pass --real and/or --model")
    if design == "paired" and (REAL_GROUP not in pools or len(pools) < 2):
        raise StudyError("a paired study needs real images and at least one model", fix="pass --real and --model")
    calib = _sample_calibration(pools, chosen, calibration, design, rng)
    calib_keys = {(c.group, str(c.path)) for c in calib}
    chosen += calib
    secrets.SystemRandom().shuffle(chosen)  # also the order files are written in: nothing groups by source on disk

    # 3. source sizes: choose the study size, refuse enlargement unless asked
    sizes = _geometry(chosen)
    if image_size is None:
        image_size = max(16, min(max_image_size, min(min(d) for d in sizes)))
    warnings = _check_enlargement(chosen, sizes, image_size, allow_enlarge)

    # 4. blind every image through the one pipeline into the study folder, under opaque ids
    from synthcxr.study.settings import load_settings

    root = Path(study_dir) if study_dir is not None else load_settings().dir
    image_dir = (root / "images" / _slug(name)).resolve()
    if image_dir.exists() and any(image_dir.iterdir()):
        raise StudyError("the study image folder already exists and is not empty", file=image_dir,
                         fix="choose another --name or --dir (nothing was overwritten)")
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Image] = []
    sexes: dict[str, str | None] = {}
    bars: list[float] = []
    feats: dict[str, list[dict[str, float]]] = {}
    try:
        with progress_bar(len(chosen), "blinding images") as (bar, task):
            for src in chosen:
                blinded = blind(src.path, image_size)
                image_id = opaque_id()
                atomic_write_bytes(image_dir / f"{image_id}.png", blinded.data)
                role = "calibration" if (src.group, str(src.path)) in calib_keys else "study"
                sexes[image_id] = src.sex
                rows.append(Image(id=image_id, source=src.source, model=src.group, intended_label=src.label,
                                  original_path=str(src.path), prompt=src.prompt, sha256=sha256_bytes(blinded.data),
                                  role=role))
                bars.append(blinded.bars)
                feats.setdefault(src.group, []).append(features(blinded.data))
                bar.advance(task)
    except BaseException:
        shutil.rmtree(image_dir, ignore_errors=True)  # only files this call just made
        raise

    # 5. record sizes and framing, and how well file properties alone separate real from each model
    check = leak_check(feats, REAL_GROUP)
    warnings += warnings_for(check)
    blinding = {"image_size": image_size, "groups": _group_framing(chosen, sizes, bars, image_size),
                "leak_check": check, "warnings": warnings}
    for warning in warnings:
        log.warning("study %r: %s", name, warning)

    # 6. one transaction: study, images, readers, tasks
    invites: dict[str, str] = {}
    admin_token = None
    try:
        with session_scope(db_url) as session:
            secret = secret_for(session)
            study = Study(name=name, seed=seed, image_dir=str(image_dir), image_size=image_size,
                          questions=q.model_dump(mode="json"), repeats=repeats, order_key=new_order_key(),
                          blinding=blinding, design=design,
                          options=_design_options(rows, design, calibration, counterbalance, seed, sexes))
            session.add(study)
            session.flush()
            for row in rows:
                row.study_id = study.id
            session.add_all(rows)
            session.flush()
            for reader_name in reader_names:
                invites[reader_name] = invite_url(base_url, _add_reader(session, study, reader_name, secret))
            if not _active_admin_tokens(session, admin_token_days()):
                admin_token = new_token()
                session.add(AdminToken(token_hash=hash_token(secret, "admin:" + admin_token)))
    except IntegrityError as exc:
        shutil.rmtree(image_dir, ignore_errors=True)
        raise StudyError(f"could not create study {name!r}: {exc.orig}", fix="choose another --name") from None
    groups: dict[str, int] = {}
    for row in rows:
        groups[row.model] = groups.get(row.model, 0) + 1
    log.info("study %r: %d images (%s) at %d px, %d readers", name, len(rows),
             ", ".join(f"{g}={n}" for g, n in sorted(groups.items())), image_size, len(reader_names))
    n_main = sum(r.role == "study" for r in rows)
    per_reader = (len(study.options.get("pairs", [])) + len(study.options.get("calibration_pairs", []))
                  if design == "paired" else len(rows) + min(repeats, n_main))
    return CreatedStudy(name, invites, len(rows), per_reader, image_dir, admin_token, groups, blinding, warnings)


def _sample_calibration(pools: dict[str, tuple[list[SourceImage], Path]], chosen: list[SourceImage], n: int,
                        design: str, rng: random.Random) -> list[SourceImage]:
    """`n` calibration images (paired: `n` synthetic + `n` real) from images not in the study:
    single design about half real, the rest spread over the models in turn."""
    if n == 0:
        return []
    used = {(c.group, str(c.path)) for c in chosen}
    left = {g: [i for i in imgs if (g, str(i.path)) not in used] for g, (imgs, _) in pools.items()}
    models = sorted(g for g in pools if g != REAL_GROUP)
    want: dict[str, int] = {}
    if design == "paired":
        want[REAL_GROUP] = n
        for k in range(n):
            want[models[k % len(models)]] = want.get(models[k % len(models)], 0) + 1
    else:
        n_real = (n + 1) // 2 if REAL_GROUP in pools and models else n if REAL_GROUP in pools else 0
        if n_real:
            want[REAL_GROUP] = n_real
        for k in range(n - n_real):
            want[models[k % len(models)]] = want.get(models[k % len(models)], 0) + 1
    out: list[SourceImage] = []
    for group, k in want.items():
        if k > len(left[group]):
            raise StudyError(f"{group!r} has {len(left[group])} images left after the study sample, "
                             f"{k} needed for --calibration {n}", file=pools[group][1],
                             fix="lower --calibration, --per-model or --real-count, or bring more images")
        out += rng.sample(left[group], k)
    return out


def _design_options(rows: Sequence[Image], design: str, calibration: int, counterbalance: bool,
                    seed: int, sexes: dict[str, str | None]) -> dict[str, Any]:
    """What the design needs later (stored with the study, never shown to readers): the pairs of a
    paired study are fixed here, so every reader reads the same cases (what MRMC analysis needs)."""
    options: dict[str, Any] = {"calibration": calibration, "counterbalance": counterbalance}
    if design == "paired":
        for role, key in (("study", "pairs"), ("calibration", "calibration_pairs")):
            info = [{"id": r.id, "model": r.model, "label": r.intended_label, "sex": sexes.get(r.id)}
                    for r in rows if r.role == role]
            options[key] = make_pairs([i for i in info if i["model"] == REAL_GROUP],
                                      [i for i in info if i["model"] != REAL_GROUP], random.Random(f"pairs:{seed}"))
    return options


def get_study(session: Session, name: str) -> Study:
    study = session.scalar(select(Study).where(Study.name == name))
    if study is None:
        known = list(session.scalars(select(Study.name).order_by(Study.name)))
        raise StudyError(f"no study called {name!r} in this database",
                         fix=f"known studies: {', '.join(known) or '(none)'}; check the name and --db")
    return study


def add_reader(db_url: str, name: str, reader_name: str | None = None, base_url: str = "http://127.0.0.1:8000") -> str:
    """Add a reader to an existing study; returns their one-time invite link."""
    ensure_db(db_url)
    with session_scope(db_url) as session:
        study = get_study(session, name)
        if reader_name is None:
            n = session.scalar(select(func.count()).select_from(Reader).where(Reader.study_id == study.id)) or 0
            existing = set(session.scalars(select(Reader.name).where(Reader.study_id == study.id)))
            while f"reader-{n + 1}" in existing:
                n += 1
            reader_name = f"reader-{n + 1}"
        return invite_url(base_url, _add_reader(session, study, reader_name, secret_for(session)))


def reissue_invite(db_url: str, name: str, reader_name: str, base_url: str = "http://127.0.0.1:8000") -> str:
    """A new one-time link for a reader (lost link / new browser); their answers are kept, their
    old link and old browser sessions stop working."""
    ensure_db(db_url)
    with session_scope(db_url) as session:
        study = get_study(session, name)
        reader = session.scalar(select(Reader).where(Reader.study_id == study.id, Reader.name == reader_name))
        if reader is None:
            raise StudyError(f"study {name!r} has no reader {reader_name!r}", fix="see `synthcxr study status`")
        token = new_token()
        reader.invite_hash = hash_token(secret_for(session), "invite:" + token)
        reader.invite_used_at = None
        session.execute(db.WebSession.__table__.delete().where(db.WebSession.reader_id == reader.id))
        return invite_url(base_url, token)


# --- answers --------------------------------------------------------------------------------------


def record_answer(session: Session, task: Task, answer: AnswerInput) -> bool:
    """Store and commit one answer. Returns False if the task was already answered (double submit,
    second tab): the first answer stands and nothing is duplicated.

    The unique constraint on `answer.task_id` is the real guard: if two requests race past the
    check below, the loser's INSERT fails and its transaction is rolled back. Callers therefore
    commit any earlier work of theirs first (savepoints are avoided: SQLite drivers differ on them).
    """
    if session.scalar(select(Answer.id).where(Answer.task_id == task.id)) is not None:
        return False
    server_ms = None
    if task.shown_at is not None:
        server_ms = max(0, int((db.utcnow() - task.shown_at).total_seconds() * 1000))
    try:
        session.add(Answer(task_id=task.id, realism=answer.realism, judged_real=answer.judged_real,
                           confidence=answer.confidence, finding=answer.finding, comment=answer.comment,
                           client_ms=answer.client_ms, server_ms=server_ms, picked=answer.picked))
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    return True


def answer_matches(session: Session, task: Task, answer: AnswerInput) -> bool:
    """Whether the stored answer of `task` says the same as `answer` (a double submit, not a change
    of mind in a second tab); the time taken does not count."""
    stored = session.scalar(select(Answer).where(Answer.task_id == task.id))
    return stored is not None and (stored.realism, stored.judged_real, stored.confidence, stored.finding,
                                   stored.comment, stored.picked) == (answer.realism, answer.judged_real,
                                                                      answer.confidence, answer.finding,
                                                                      answer.comment, answer.picked)


def progress(session: Session, reader_id: int) -> tuple[int, int]:
    """(answered, total) tasks of one reader."""
    total = session.scalar(select(func.count()).select_from(Task).where(Task.reader_id == reader_id)) or 0
    done = session.scalar(
        select(func.count()).select_from(Answer).join(Task, Answer.task_id == Task.id).where(Task.reader_id == reader_id)
    ) or 0
    return done, total


def next_task(session: Session, reader_id: int) -> Task | None:
    """The reader's first unanswered task in their order (so a reload continues where they stopped)."""
    return session.scalar(
        select(Task).outerjoin(Answer, Answer.task_id == Task.id)
        .where(Task.reader_id == reader_id, Answer.id.is_(None)).order_by(Task.position).limit(1)
    )


def simulate_answers(db_url: str, name: str, seed: int = 0) -> int:
    """Answer every open task with plausible made-up ratings (for the demo and tests only).

    Real images get higher realism on average than synthetic ones, each model its own offset and
    each reader their own bias, so the analysis has something to find. Returns answers added.
    """
    import numpy as np

    ensure_db(db_url)
    rng = np.random.default_rng(seed)
    added = 0
    with session_scope(db_url) as session:
        study = get_study(session, name)
        q = QuestionsConfig.model_validate(study.questions)
        groups = sorted({img.model for img in study.images})
        offset = {g: (0.8 if g == REAL_GROUP else -0.3 - 0.4 * i) for i, g in enumerate(groups)}
        for reader in study.readers:
            bias = rng.normal(0, 0.3)
            for task in reader.tasks:
                if task.answer is not None:
                    continue
                image = task.image
                if task.image2 is not None:  # paired: right more often for the weaker models
                    synthetic = image if image.source != REAL_GROUP else task.image2
                    p_right = 1 / (1 + np.exp(offset[synthetic.model] + 0.3 + bias))
                    right = rng.random() < p_right
                    syn_side = "left" if synthetic is image else "right"
                    picked = syn_side if right else ("right" if syn_side == "left" else "left")
                    added += record_answer(session, task, AnswerInput(
                        None, None, int(rng.integers(1, 4)) if q.confidence else None, None, None,
                        int(rng.integers(2000, 20000)), picked))
                    continue
                latent = 3.0 + offset[image.model] + bias + rng.normal(0, 0.8)
                realism = int(np.clip(np.rint(latent), 1, 5))
                p_real = 1 / (1 + np.exp(-(latent - 3.0) * 1.5))
                judged_real = bool(rng.random() < p_real)
                conf = int(np.clip(1 + abs(latent - 3.0) * 1.2 + rng.normal(0, 0.5), 1, 3))
                finding = None
                if q.finding:
                    truth = image.intended_label
                    if truth and rng.random() < 0.7:
                        finding = truth
                    else:
                        finding = str(rng.choice(["tuberculosis", "normal", "unsure"]))
                answer = AnswerInput(realism if q.realism else None, judged_real if q.real_vs_synthetic else None,
                                     conf if q.real_vs_synthetic and q.confidence else None, finding, None,
                                     int(rng.integers(2000, 20000)))
                added += record_answer(session, task, answer)
    return added


# --- export / status / analysis -------------------------------------------------------------------

EXPORT_COLUMNS = [
    "study", "reader", "position", "task_id", "image_id", "repeat_of_position", "source", "model",
    "intended_label", "realism", "judged_real", "confidence", "finding", "comment", "client_ms", "server_ms",
    "answered_at", "original_path", "prompt",
    # added with the paired design and the calibration block (kept last: older scripts read by position)
    "design", "phase", "block", "image2_id", "source2", "synthetic_side", "picked", "correct", "original_path2",
]
"""`phase` is "calibration" for the calibration block (answers given with feedback, never analysed).
Paired rows: image_id/source/original_path are the left image, image2_id/source2/original_path2 the
right one; model and intended_label are the synthetic image's; picked is the side called synthetic."""


def ratings_table(db_url: str, name: str) -> list[dict[str, Any]]:
    """Every answer of a study, unblinded (admin use only), one dict per answer."""
    ensure_db(db_url)
    with session_scope(db_url) as session:
        study = get_study(session, name)
        positions = {t.id: t.position for r in study.readers for t in r.tasks}
        rows = []
        images = {i.id: i for i in study.images}
        stmt = (
            select(Answer, Task, Reader)
            .join(Task, Answer.task_id == Task.id).join(Reader, Task.reader_id == Reader.id)
            .where(Reader.study_id == study.id).order_by(Reader.id, Task.position)
        )
        for answer, task, reader in session.execute(stmt):
            image, image2 = images[task.image_id], images.get(task.image2_id) if task.image2_id else None
            row = {
                "study": study.name, "design": study.design, "phase": task.phase, "block": task.block,
                "reader": reader.name, "position": task.position, "task_id": task.public_id,
                "image_id": image.id,
                "repeat_of_position": positions.get(task.repeat_of) if task.repeat_of is not None else None,
                "source": image.source, "model": image.model, "intended_label": image.intended_label,
                "realism": answer.realism, "judged_real": answer.judged_real, "confidence": answer.confidence,
                "finding": answer.finding, "comment": answer.comment, "image2_id": None, "source2": None,
                "synthetic_side": None, "picked": answer.picked, "correct": None, "client_ms": answer.client_ms,
                "server_ms": answer.server_ms, "answered_at": answer.answered_at.isoformat(),
                "original_path": image.original_path, "prompt": image.prompt, "original_path2": None,
            }
            if answer.judged_real is not None:
                row["correct"] = answer.judged_real == (image.source == REAL_GROUP)
            if image2 is not None:
                synthetic = image2 if image.source == REAL_GROUP else image
                side = "left" if synthetic is image else "right"
                row.update(image2_id=image2.id, source2=image2.source, original_path2=image2.original_path,
                           model=synthetic.model, intended_label=synthetic.intended_label, prompt=synthetic.prompt,
                           synthetic_side=side, correct=answer.picked == side)
            rows.append(row)
        return rows


def ratings_csv(rows: list[dict[str, Any]]) -> str:
    """CSV of `ratings_table` rows; text that a spreadsheet would run as a formula is neutralised."""
    return csv_text(rows, EXPORT_COLUMNS)


def mrmc_csv(rows: list[dict[str, Any]]) -> str:
    """The study's main answers (calibration and repeats left out) in the long format MRMCaov and
    iMRMC read: reader, case, modality (model), truth (1 = synthetic), rating (higher = more synthetic)."""
    from synthcxr.study.inference import MRMC_COLUMNS, mrmc_readings

    main = [r for r in rows if r.get("phase") in (None, "main") and r.get("repeat_of_position") is None]
    return csv_text(mrmc_readings(main), MRMC_COLUMNS)


def export_ratings(db_url: str, name: str, out: str | Path, mrmc: bool = False) -> Path:
    """Write all answers as CSV (one row per answer, unblinded), or with `mrmc` the MRMC long
    format (`mrmc_csv`). Refuses to overwrite a file."""
    out = Path(out)
    if out.exists():
        raise StudyError("output file already exists", file=out, fix="choose another --out (ratings are never overwritten)")
    rows = ratings_table(db_url, name)
    atomic_write_text(out, mrmc_csv(rows) if mrmc else ratings_csv(rows))
    log.info("wrote %d %s to %s", len(rows), "answers in MRMC format" if mrmc else "ratings", out)
    return out


def study_status(db_url: str, name: str | None = None) -> list[dict[str, Any]]:
    """Per study and reader: answered/total, whether the invite was used, last answer time."""
    ensure_db(db_url)
    out = []
    with session_scope(db_url) as session:
        studies = [get_study(session, name)] if name else list(session.scalars(select(Study).order_by(Study.id)))
        for study in studies:
            readers = []
            for reader in study.readers:
                done, total = progress(session, reader.id)
                last = session.scalar(
                    select(func.max(Answer.answered_at)).join(Task, Answer.task_id == Task.id)
                    .where(Task.reader_id == reader.id)
                )
                readers.append({"reader": reader.name, "answered": done, "total": total,
                                "joined": reader.invite_used_at is not None,
                                "last_answer": last.isoformat() if last else None})
            out.append({"study": study.name, "created_at": study.created_at.isoformat(), "images": len(study.images),
                        "readers": readers})
    return out


def analyze_study(db_url: str, name: str, out_dir: str | Path, seed: int = 0, n_boot: int = 2000,
                  delta: float = 0.05) -> dict[str, Any]:
    """Statistics a paper needs (see `analysis.analyze`), written as JSON/CSV tables and PNG plots."""
    from synthcxr.study.analysis import analyze, write_outputs

    rows = ratings_table(db_url, name)
    if not rows:
        raise StudyError(f"study {name!r} has no answers yet", fix="wait for readers (see `synthcxr study status`)")
    result = analyze(rows, seed=seed, n_boot=n_boot, delta=delta)
    result["study"] = name
    result["generated_at"] = dt.datetime.now(dt.UTC).isoformat()
    write_outputs(result, rows, Path(out_dir))
    return result


def default_db_url() -> str:
    """The URL from SYNTHCXR_STUDY_DB or the default SQLite file."""
    from synthcxr.study.settings import load_settings

    return load_settings().db
