"""Blinding: nothing a reader's browser receives tells real from synthetic images."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image
from sqlalchemy import select
from study_helpers import FULL_ANSWER, csrf_of, sign_in_reader, task_of

from synthcxr.study.db import Image as ImageRow
from synthcxr.study.db import Reader, Task, session_scope
from synthcxr.study.images import blind_png, png_chunks

# words and values that would give the game away if they appeared anywhere a reader can see
LEAKS = ["synthetic-source", "model_a", "model_b", "manifest", "generated", "CHNCXR", "CXR_png", "real/",
         "sks", "prompt", "seed=", "parameters", "chest x-ray,"]


def _source_of_tasks(db_url: str) -> dict[str, str]:
    with session_scope(db_url) as s:
        rows = s.execute(select(Task.public_id, ImageRow.source, ImageRow.model, ImageRow.id)
                         .join(ImageRow, Task.image_id == ImageRow.id))
        return {pid: (src, model, image_id) for pid, src, model, image_id in rows}


def test_stored_files_are_identical_in_format_size_and_length(study):
    with session_scope(study.db_url) as s:
        images = list(s.scalars(select(ImageRow)))
    assert {i.source for i in images} == {"real", "synthetic"}
    lengths, formats = set(), set()
    for row in images:
        path = study.image_dir / f"{row.id}.png"
        data = path.read_bytes()
        assert png_chunks(data) == ["IHDR", "IDAT", "IEND"], "metadata chunk survived"
        with Image.open(path) as img:
            formats.add((img.format, img.mode, img.size, tuple(sorted(img.info))))
        lengths.add(len(data))
        # ids are random tokens, not derived from the source file
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", row.id)
        assert row.model not in row.id
    assert formats == {("PNG", "L", (64, 64), ())}
    assert len(lengths) == 1, "byte lengths differ between images"


def test_served_pages_images_and_headers_do_not_reveal_the_source(study, make_client):
    truth = _source_of_tasks(study.db_url)
    client = make_client()
    page = sign_in_reader(client, study.invites["reader-1"])
    header_sets = {}
    image_lengths = set()
    seen = set()
    while task_of(page):
        task = task_of(page)
        source, model, image_id = truth[task]
        seen.add(source)
        # page: no model/source words, no image id, no file names; same page apart from ids/progress
        names = [model] if source == "synthetic" else []  # the real group is just called "real"
        for leak in [*LEAKS, *names, image_id]:
            assert leak not in page, f"{leak!r} visible on a {source} page"
        normalized = re.sub(r"(/read/(?:image|answer)/)[A-Za-z0-9_-]+", r"\1ID", page)
        normalized = re.sub(r"Image \d+ of|data-done=\"\d+\"|aria-valuenow=\"\d+\"", "N", normalized)
        header_sets.setdefault("page", set()).add(normalized)
        img = client.get(f"/read/image/{task}")
        assert img.status_code == 200
        headers = {k: v for k, v in img.headers.items() if k not in ("date",)}
        header_sets.setdefault("img", set()).add(tuple(sorted(headers.items())))
        assert "etag" not in headers and "last-modified" not in headers
        assert headers["cache-control"] == "no-store" and headers["content-type"] == "image/png"
        assert png_chunks(img.content) == ["IHDR", "IDAT", "IEND"]
        image_lengths.add(len(img.content))
        for leak in [*names, image_id]:
            assert leak.encode() not in img.content
        resp = client.post(f"/read/answer/{task}", data={**FULL_ANSWER, "csrf_token": csrf_of(page)},
                           follow_redirects=False)
        assert resp.headers["location"] == "/read"  # the redirect is the same whatever the answer/source
        page = client.get("/read").text
    assert seen == {"real", "synthetic"}
    assert len(header_sets["page"]) == 1, "reading pages differ by more than ids and progress"
    assert len(header_sets["img"]) == 1, "image responses have source-dependent headers"
    assert len(image_lengths) == 1


def test_task_ids_differ_between_readers_and_for_repeats(study):
    with session_scope(study.db_url) as s:
        tasks = list(s.scalars(select(Task)))
    ids = [t.public_id for t in tasks]
    assert len(set(ids)) == len(ids)
    repeats = [t for t in tasks if t.repeat_of is not None]
    assert len(repeats) == 2  # one per reader
    for t in repeats:
        original = next(o for o in tasks if o.id == t.repeat_of)
        assert original.image_id == t.image_id and original.public_id != t.public_id
        assert t.position > original.position + 1


def test_pipeline_strips_metadata_and_normalizes_any_input(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(rgb)
    sixteen = tmp_path / "deep.png"
    Image.fromarray(np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)).save(sixteen)
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(jpeg, quality=90)
    outs = [blind_png(p, 48) for p in (rgb, sixteen, jpeg)]
    assert len({len(o) for o in outs}) == 1
    for out in outs:
        assert png_chunks(out) == ["IHDR", "IDAT", "IEND"]
    arr = np.asarray(Image.open(__import__("io").BytesIO(outs[1])))
    assert arr.min() < 10 and arr.max() > 245  # 16-bit range stretched, not clipped to black/white


def test_repeats_are_not_byte_identical_files(study, make_client):
    """Each task gets its own imperceptible dither (at most 1 grey level): a repeat, or the same image
    for another reader, cannot be matched by comparing bytes; the same task always gets the same file."""
    import io

    with session_scope(study.db_url) as s:
        repeat = s.scalar(select(Task).join(Reader, Task.reader_id == Reader.id)
                          .where(Task.repeat_of.is_not(None), Reader.name == "reader-1"))
        original = s.get(Task, repeat.repeat_of)
        pair = (original.public_id, repeat.public_id)
        stored = (study.image_dir / f"{repeat.image_id}.png").read_bytes()
    client = make_client()
    sign_in_reader(client, study.invites["reader-1"])
    first, second = (client.get(f"/read/image/{pid}").content for pid in pair)
    assert first != second and len(first) == len(second) == len(stored)
    assert client.get(f"/read/image/{pair[0]}").content == first  # stable per task
    arrays = [np.asarray(Image.open(io.BytesIO(b)), dtype=int) for b in (stored, first, second)]
    for served in arrays[1:]:
        assert served.shape == arrays[0].shape and np.abs(served - arrays[0]).max() <= 1
        assert png_chunks(first) == ["IHDR", "IDAT", "IEND"]
