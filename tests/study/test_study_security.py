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


def test_wrong_admin_tokens_get_429_but_never_lock_out_the_right_token(study):
    client = _client(study, login_attempts=3)
    for _ in range(3):
        assert _wrong_admin_login(client).status_code == 403
    blocked = _wrong_admin_login(client)
    assert blocked.status_code == 429 and 0 < int(blocked.headers["retry-after"]) <= 15 * 60
    assert "Try again in" in blocked.text
    # a colleague behind the same address signs in with the right token
    sign_in_admin(client, study.admin_token)
    # and the scanner is still refused
    from fastapi.testclient import TestClient

    assert _wrong_admin_login(TestClient(client.app, client=("10.0.0.1", 50001))).status_code == 429


def test_failures_are_limited_per_token_as_well_as_per_address(study):
    from fastapi.testclient import TestClient

    app = _client(study, login_attempts=2).app
    for n in range(2):  # the same wrong token from two addresses
        assert _wrong_admin_login(TestClient(app, client=(f"10.1.0.{n}", 1))).status_code == 403
    assert _wrong_admin_login(TestClient(app, client=("10.1.0.9", 1))).status_code == 429  # new address, same token
    page = TestClient(app, client=("10.1.0.9", 1))
    form = page.get("/admin/login")
    other = page.post("/admin/login", data={"csrf_token": csrf_of(form.text), "token": "another-guess"})
    assert other.status_code == 403  # that address itself has no failures yet


def test_successful_sign_ins_do_not_count(study):
    client = _client(study, login_attempts=2)
    for _ in range(5):
        sign_in_admin(client, study.admin_token)
    assert _wrong_admin_login(client).status_code == 403
    sign_in_admin(client, study.admin_token)  # one failure: still under the limit


def test_guessed_invite_links_are_limited_but_real_links_still_work(study):
    client = _client(study, login_attempts=2)
    for guess in ("aaaa", "bbbb"):
        assert client.get(f"/invite/{guess}").status_code == 404
    resp = client.get("/invite/cccc")
    assert resp.status_code == 429 and "retry-after" in resp.headers
    # a reader behind the same (hospital) address opens their own link normally
    sign_in_reader(client, study.invites["reader-1"])


def test_start_button_posts_the_token_in_the_body(study):
    client = _client(study, login_attempts=2)
    page = client.get(invite_path(study.invites["reader-1"]))
    token = study.invites["reader-1"].rsplit("/", 1)[1]
    assert client.post("/invite", data={"csrf_token": csrf_of(page.text), "token": "guess"}).status_code == 404
    resp = client.post("/invite", data={"csrf_token": csrf_of(page.text), "token": token}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/read"
    assert "Image 1 of" in client.get("/read").text
    # pressing Start again on the old page (same browser, valid session) just continues reading
    again = client.post("/invite", data={"csrf_token": csrf_of(page.text), "token": token}, follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/read"


def test_reopening_a_used_invite_continues_and_is_not_a_failure(study):
    from fastapi.testclient import TestClient

    client = _client(study, login_attempts=2)
    link = invite_path(study.invites["reader-1"])
    sign_in_reader(client, link)
    resp = client.get(link, follow_redirects=False)  # bookmarked invite, same browser
    assert resp.status_code == 303 and resp.headers["location"] == "/read"
    assert "Image 1 of" in client.get(link).text
    other = TestClient(client.app, client=("10.0.0.1", 50001))  # same address, no session
    for _ in range(5):
        spent = other.get(link)
        assert spent.status_code == 404 and "already been used" in spent.text
    second = TestClient(client.app, client=("10.0.0.1", 50002))
    sign_in_reader(second, study.invites["reader-2"])
    assert second.get(link).status_code == 404  # another reader's session does not open it either
    assert other.get("/invite/guess-1").status_code == 404  # spent links were not counted as failures


def test_forwarded_for_is_trusted_only_from_configured_proxies(study):
    from fastapi.testclient import TestClient

    direct = _client(study, ip="10.0.0.7", login_attempts=2)
    for n in range(2):  # a client forging X-Forwarded-For is still counted by its own address
        assert direct.get(f"/invite/guess-{n}", headers={"X-Forwarded-For": f"1.1.1.{n}"}).status_code == 404
    assert direct.get("/invite/guess-x", headers={"X-Forwarded-For": "1.1.1.9"}).status_code == 429
    proxied = _client(study, ip="10.0.0.2", login_attempts=2, trusted_proxies="10.0.0.2")
    for n in range(2):
        assert proxied.get(f"/invite/g-{n}", headers={"X-Forwarded-For": "7.7.7.7"}).status_code == 404
    assert proxied.get("/invite/g-x", headers={"X-Forwarded-For": "7.7.7.7"}).status_code == 429
    # behind the proxy, another client is another address (a forged hop to the left is ignored)
    other = TestClient(proxied.app, client=("10.0.0.2", 2))
    assert other.get("/invite/g-y", headers={"X-Forwarded-For": "7.7.7.7, 8.8.8.8"}).status_code == 404


def test_the_real_server_does_not_trust_forwarded_for_by_default(study):
    settings = StudySettings(db=study.db_url, dir=study.root / "studydir", login_attempts=2)
    with background_server(settings) as base, httpx.Client(base_url=base) as http:
        codes = [http.get(f"/invite/guess-{n}", headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
                 for n in range(3)]
    assert codes == [404, 404, 429]


def test_trusted_proxies_setting(monkeypatch):
    from synthcxr.errors import SynthCXRError
    from synthcxr.study.settings import load_settings

    monkeypatch.setenv("SYNTHCXR_STUDY_TRUSTED_PROXIES", "10.0.0.1, 192.168.0.0/16")
    assert load_settings().trusted_proxies == ["10.0.0.1", "192.168.0.0/16"]
    monkeypatch.setenv("SYNTHCXR_STUDY_TRUSTED_PROXIES", "proxy.local")
    with pytest.raises(SynthCXRError, match="proxy.local"):
        load_settings()
    monkeypatch.delenv("SYNTHCXR_STUDY_TRUSTED_PROXIES")
    assert load_settings().trusted_proxies == []


# --- admin pages ------------------------------------------------------------------------------------


def test_admin_links_use_the_configured_base_url_not_the_host_header(study):
    from fastapi.testclient import TestClient

    from synthcxr.study.app import create_app

    app = create_app(StudySettings(db=study.db_url, dir=study.root / "studydir", base_url="https://study.example.org"))
    admin = TestClient(app, base_url="http://attacker.example")
    sign_in_admin(admin, study.admin_token)
    page = admin.get(f"/admin/study/{study.name}")
    added = admin.post(f"/admin/study/{study.name}/readers", data={"csrf_token": csrf_of(page.text), "reader_name": "dr-x"})
    reissued = admin.post(f"/admin/study/{study.name}/readers/reader-2/reissue",
                          data={"csrf_token": csrf_of(page.text), "confirm": "yes"})
    for resp in (added, reissued):
        link = resp.text.split("<code>")[1].split("</code>")[0]
        assert link.startswith("https://study.example.org/invite/") and "attacker" not in resp.text


def test_new_link_asks_for_confirmation(study, make_client):
    admin = make_client()
    sign_in_admin(admin, study.admin_token)
    page = admin.get(f"/admin/study/{study.name}")
    assert 'action="/admin/study/tb-realism/readers/reader-1/reissue"' not in page.text  # a link to a question now
    ask = admin.get(f"/admin/study/{study.name}/readers/reader-1/reissue")
    assert ask.status_code == 200 and "stops working" in ask.text and 'name="confirm" value="yes"' in ask.text
    unconfirmed = admin.post(f"/admin/study/{study.name}/readers/reader-1/reissue", data={"csrf_token": csrf_of(page.text)})
    assert unconfirmed.status_code == 200 and "<code>" not in unconfirmed.text  # asked again, nothing changed
    sign_in_reader(make_client(), study.invites["reader-1"])  # the old link still works
    done = admin.post(f"/admin/study/{study.name}/readers/reader-2/reissue",
                      data={"csrf_token": csrf_of(page.text), "confirm": "yes"})
    assert "<code>" in done.text
    assert make_client().get(invite_path(study.invites["reader-2"])).status_code == 404


def test_names_with_a_slash_are_refused_with_a_clear_error(tmp_path, sources, study, make_client):
    from synthcxr.errors import StudyError

    url = f"sqlite:///{tmp_path / 'names.sqlite3'}"
    with pytest.raises(StudyError, match=r"study name 'tb/v2' contains '/'"):
        service.create_study(url, "tb/v2", models=[sources["model_b"]], per_model=2, readers=1,
                             study_dir=tmp_path / "n1")
    with pytest.raises(StudyError, match=r"reader name 'dr/a' contains '/'"):
        service.create_study(url, "tb", models=[sources["model_b"]], per_model=2, readers=["dr/a"],
                             study_dir=tmp_path / "n2")
    assert service.study_status(url) == []
    with pytest.raises(StudyError, match="contains '/'"):
        service.add_reader(study.db_url, study.name, "a/b")
    admin = make_client()
    sign_in_admin(admin, study.admin_token)
    page = admin.get(f"/admin/study/{study.name}")
    resp = admin.post(f"/admin/study/{study.name}/readers", data={"csrf_token": csrf_of(page.text), "reader_name": "x/y"})
    assert resp.status_code == 400 and "contains &#39;/&#39;" in resp.text
    # other characters are fine in names and admin links
    service.add_reader(study.db_url, study.name, "Dr. Ana #2?")
    page = admin.get(f"/admin/study/{study.name}")
    ask = admin.get(f"/admin/study/{study.name}/readers/Dr.%20Ana%20%232%3F/reissue")
    assert ask.status_code == 200 and "Dr. Ana #2?" in ask.text
    assert "/readers/Dr.%20Ana%20%232%3F/reissue" in page.text


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
                assert spent.status_code == 200 and "Image 1 of" in spent.text  # own spent link: continues
        finally:
            logging.getLogger("uvicorn.access").removeHandler(capture)
    out = capfd.readouterr()
    logged = "\n".join(capture.messages)
    assert logged.count("/invite/[redacted]") == 2 and '"POST /invite HTTP/1.1" 303' in logged and "GET /read" in logged
    assert token not in logged and token not in out.out and token not in out.err
    assert "/invite/[redacted]" in out.out + out.err  # the access log itself was written, redacted
