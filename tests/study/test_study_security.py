"""Security polish: failed-token rate limit, admin token expiry/revocation, no tokens in logs."""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update
from study_helpers import csrf_of, invite_path, run_cli, sign_in_admin, sign_in_reader

from synthcxr.study import service
from synthcxr.study.db import AdminToken, WebSession, session_scope, utcnow
from synthcxr.study.ratelimit import AttemptLimiter
from synthcxr.study.server import RedactTokensFilter, background_server, redact_tokens
from synthcxr.study.settings import StudySettings


def _client(study, ip: str = "10.0.0.1", **settings):
    from fastapi.testclient import TestClient

    from synthcxr.study.app import create_app

    app = create_app(StudySettings(db=study.db_url, dir=study.root / "studydir", **settings))
    return TestClient(app, client=(ip, 50000))


def _wrong_admin_login(client) -> httpx.Response:
    page = client.get("/admin/login")
    return client.post("/admin/login", data={"csrf_token": csrf_of(page.text), "token": "not-the-token"})


# --- rate limit ---------------------------------------------------------------------------------


def test_limiter_counts_failures_in_a_sliding_window():
    now = [100.0]
    limiter = AttemptLimiter(3, 60, clock=lambda: now[0])
    for _ in range(2):
        limiter.failed("a")
    assert limiter.retry_after("a") is None
    now[0] = 110.0
    limiter.failed("a")
    assert limiter.retry_after("a") == 50  # the first failure (t=100) leaves the window at t=160
    assert limiter.retry_after("b") is None  # other addresses are unaffected
    now[0] = 160.5
    assert limiter.retry_after("a") is None  # only the t=110 failure is left in the window
    limiter.failed("a")
    assert limiter.retry_after("a") is None
    limiter.failed("a")
    assert limiter.retry_after("a") == 10  # blocked again until the t=110 failure ages out
    disabled = AttemptLimiter(0, 60)
    for _ in range(100):
        disabled.failed("a")
    assert disabled.retry_after("a") is None


def test_wrong_admin_tokens_get_429_and_block_even_the_right_token(study):
    client = _client(study, login_attempts=3)
    for _ in range(3):
        assert _wrong_admin_login(client).status_code == 403
    blocked = _wrong_admin_login(client)
    assert blocked.status_code == 429 and 0 < int(blocked.headers["retry-after"]) <= 15 * 60
    assert "Try again in" in blocked.text
    page = client.get("/admin/login")
    right = client.post("/admin/login", data={"csrf_token": csrf_of(page.text), "token": study.admin_token})
    assert right.status_code == 429  # no oracle while blocked
    # another address signs in normally (same app: the limiter is per client address)
    from fastapi.testclient import TestClient

    other = TestClient(client.app, client=("10.0.0.2", 50000))
    sign_in_admin(other, study.admin_token)


def test_successful_sign_ins_do_not_count(study):
    client = _client(study, login_attempts=2)
    for _ in range(5):
        sign_in_admin(client, study.admin_token)
    assert _wrong_admin_login(client).status_code == 403
    sign_in_admin(client, study.admin_token)  # one failure: still under the limit


def test_guessed_invite_links_are_limited_too(study):
    client = _client(study, login_attempts=2)
    for guess in ("aaaa", "bbbb"):
        assert client.get(f"/invite/{guess}").status_code == 404
    resp = client.get(invite_path(study.invites["reader-1"]))
    assert resp.status_code == 429 and "retry-after" in resp.headers
    # readers elsewhere are not affected
    from fastapi.testclient import TestClient

    sign_in_reader(TestClient(client.app, client=("10.9.9.9", 1)), study.invites["reader-1"])


def test_start_button_posts_the_token_in_the_body(study):
    client = _client(study, login_attempts=2)
    page = client.get(invite_path(study.invites["reader-1"]))
    token = study.invites["reader-1"].rsplit("/", 1)[1]
    assert client.post("/invite", data={"csrf_token": csrf_of(page.text), "token": "guess"}).status_code == 404
    resp = client.post("/invite", data={"csrf_token": csrf_of(page.text), "token": token}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/read"
    assert "Image 1 of" in client.get("/read").text
    page = client.get(invite_path(study.invites["reader-2"]))  # one failure so far: still allowed
    assert client.post("/invite", data={"csrf_token": csrf_of(page.text), "token": token}).status_code == 404
    assert client.get(invite_path(study.invites["reader-2"])).status_code == 429  # spent link counted too


def test_rate_limit_settings_come_from_the_environment(monkeypatch):
    from synthcxr.errors import SynthCXRError
    from synthcxr.study.settings import load_settings

    monkeypatch.setenv("SYNTHCXR_STUDY_LOGIN_ATTEMPTS", "4")
    monkeypatch.setenv("SYNTHCXR_STUDY_LOGIN_WINDOW_MINUTES", "2.5")
    monkeypatch.setenv("SYNTHCXR_STUDY_ADMIN_TOKEN_DAYS", "1")
    s = load_settings()
    assert (s.login_attempts, s.login_window_minutes, s.admin_token_days) == (4, 2.5, 1.0)
    monkeypatch.setenv("SYNTHCXR_STUDY_ADMIN_TOKEN_DAYS", "0")
    with pytest.raises(SynthCXRError, match="greater than 0"):
        load_settings()


# --- admin tokens ---------------------------------------------------------------------------------


def test_admin_tokens_are_stored_only_as_hashes(study):
    with session_scope(study.db_url) as s:
        hashes = list(s.scalars(select(AdminToken.token_hash)))
    assert len(hashes) == 1 and study.admin_token not in hashes[0]
    db_file = Path(study.db_url.removeprefix("sqlite:///"))
    raw = b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))  # file + WAL
    assert study.admin_token.encode() not in raw
    for link in study.invites.values():
        assert link.rsplit("/", 1)[1].encode() not in raw


def _age_tokens(db_url: str, days: float) -> None:
    with session_scope(db_url) as s:
        s.execute(update(AdminToken).values(created_at=utcnow() - dt.timedelta(days=days)))


def test_admin_tokens_expire_and_admin_sessions_end_with_them(study):
    client = _client(study)
    sign_in_admin(client, study.admin_token)
    with session_scope(study.db_url) as s:
        token_row = s.scalar(select(AdminToken))
        session_row = s.scalar(select(WebSession).where(WebSession.is_admin.is_(True)))
        # the admin session never outlives the token it was opened with (7 days, not 30)
        assert session_row.expires_at <= token_row.created_at + dt.timedelta(days=7, seconds=1)
    assert service.serve_admin_token(study.db_url, valid_days=7) is None  # still valid: nothing new
    _age_tokens(study.db_url, 8)
    assert service.active_admin_token_expiry(study.db_url, 7) is None
    expired = _client(study, ip="10.0.0.3")
    page = expired.get("/admin/login")
    resp = expired.post("/admin/login", data={"csrf_token": csrf_of(page.text), "token": study.admin_token})
    assert resp.status_code == 403 and "expired" in resp.text
    # a longer configured lifetime applies to existing tokens as well
    sign_in_admin(_client(study, ip="10.0.0.4", admin_token_days=30), study.admin_token)
    fresh = service.serve_admin_token(study.db_url, valid_days=7)
    assert fresh is not None
    sign_in_admin(_client(study, ip="10.0.0.5"), fresh)


def test_revoking_admin_tokens_signs_admins_out(study):
    admin = _client(study)
    sign_in_admin(admin, study.admin_token)
    newer = service.new_admin_token(study.db_url)
    assert service.revoke_admin_tokens(study.db_url) == 2
    assert admin.get("/admin").status_code == 401  # the open admin session ended
    for token in (study.admin_token, newer):
        c = _client(study, ip="10.0.1.1")
        page = c.get("/admin/login")
        assert c.post("/admin/login", data={"csrf_token": csrf_of(page.text), "token": token}).status_code == 403
    latest = service.new_admin_token(study.db_url)
    replaced = service.new_admin_token(study.db_url, revoke_old=True)
    c = _client(study, ip="10.0.1.2")
    page = c.get("/admin/login")
    assert c.post("/admin/login", data={"csrf_token": csrf_of(page.text), "token": latest}).status_code == 403
    sign_in_admin(c, replaced)
    # readers keep their sessions and answers through all of this
    reader = _client(study, ip="10.0.1.3")
    sign_in_reader(reader, study.invites["reader-1"])
    service.revoke_admin_tokens(study.db_url)
    assert "Image 1 of" in reader.get("/read").text


def test_serve_prints_a_token_only_when_needed(tmp_path, capsys, monkeypatch):
    import synthcxr.study.server as server

    started: list[StudySettings] = []
    monkeypatch.setattr(server, "serve", lambda settings, host, port: started.append(settings))
    monkeypatch.delenv("SYNTHCXR_STUDY_SECRET", raising=False)
    db = f"sqlite:///{tmp_path / 'serve.sqlite3'}"
    token_re = re.compile(r"keep it secret\): (\S+)")
    first = token_re.findall(run_cli(["study", "serve", "--db", db], capsys))
    assert len(first) == 1
    again = run_cli(["study", "serve", "--db", db], capsys)
    assert not token_re.search(again) and "valid until" in again and first[0] not in again
    second = token_re.findall(run_cli(["study", "serve", "--db", db, "--new-admin-token"], capsys))
    assert len(second) == 1 and second != first
    assert service.active_admin_token_expiry(db, 7) is not None
    assert "2 admin token(s) revoked" in run_cli(["study", "revoke-admin-tokens", "--db", db], capsys)
    third = token_re.findall(run_cli(["study", "serve", "--db", db], capsys))
    assert len(third) == 1
    fourth = token_re.findall(run_cli(["study", "serve", "--db", db, "--revoke-old"], capsys))
    with session_scope(db) as s:
        assert [r.revoked for r in s.scalars(select(AdminToken).order_by(AdminToken.id))] == [True] * 3 + [False]
    assert len(fourth) == 1 and len(started) == 5
    token = run_cli(["study", "admin-token", "--revoke-old", "--db", db], capsys).strip()
    with session_scope(db) as s:
        assert s.scalar(select(AdminToken).where(AdminToken.revoked.is_(False))).id == 5
    assert token and token not in (first[0], second[0], third[0], fourth[0])


# --- logs -------------------------------------------------------------------------------------------


def test_redaction_of_uvicorn_style_records():
    assert redact_tokens("GET /invite/abc-_123 HTTP/1.1") == "GET /invite/[redacted] HTTP/1.1"
    assert redact_tokens("POST /invite/abc?x=1") == "POST /invite/[redacted]?x=1"
    assert redact_tokens("GET /read HTTP/1.1") == "GET /read HTTP/1.1"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("1.2.3.4:5", "GET", "/invite/SECRETTOKEN", "1.1", 200), None)
    assert RedactTokensFilter().filter(record)
    assert "SECRETTOKEN" not in record.getMessage() and "/invite/[redacted]" in record.getMessage()


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_access_log_of_the_real_server_has_no_invite_tokens(study, capfd):
    settings = StudySettings(db=study.db_url, dir=study.root / "studydir")
    link = study.invites["reader-2"]
    token = link.rsplit("/", 1)[1]
    capture = _Capture()
    with background_server(settings, access_log=True) as base:
        logging.getLogger("uvicorn.access").addHandler(capture)
        try:
            with httpx.Client(base_url=base, follow_redirects=True) as http:
                page = http.get(invite_path(link))
                assert page.status_code == 200
                # the Start button posts the token in the body, not the path
                assert 'action="/invite"' in page.text
                resp = http.post("/invite", data={"csrf_token": csrf_of(page.text), "token": token})
                assert resp.status_code == 200 and "Image 1 of" in resp.text
                # an older page posting to the token path is redacted as well
                spent = http.post(invite_path(link), data={"csrf_token": csrf_of(page.text)})
                assert spent.status_code in (403, 404)  # pre-sign-in CSRF cookie is gone by now
        finally:
            logging.getLogger("uvicorn.access").removeHandler(capture)
    out = capfd.readouterr()
    logged = "\n".join(capture.messages)
    assert logged.count("/invite/[redacted]") == 2 and '"POST /invite HTTP/1.1" 303' in logged and "GET /read" in logged
    assert token not in logged and token not in out.out and token not in out.err
    assert "/invite/[redacted]" in out.out + out.err  # the access log itself was written, redacted
