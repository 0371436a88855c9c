"""The reader-study web app (FastAPI, server-rendered pages, a little JavaScript for the viewer).

Blinding rules kept here: URLs carry only random per-task ids, every image response has the same
headers (no ETag/Last-Modified, `no-store`), and pages never mention a source or model.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from synthcxr.errors import StudyError
from synthcxr.logging_utils import get_logger
from synthcxr.study import service
from synthcxr.study.db import (
    AdminToken,
    Reader,
    Task,
    WebSession,
    session_factory,
    transaction,
    utcnow,
)
from synthcxr.study.questions import (
    CONFIDENCE_LEVELS,
    FINDINGS,
    AnswerRejected,
    QuestionsConfig,
    parse_answer,
)
from synthcxr.study.ratelimit import AttemptLimiter
from synthcxr.study.security import database_secret, hash_token, new_token, same
from synthcxr.study.settings import StudySettings, load_settings

HERE = Path(__file__).parent
log = get_logger(__name__)
SESSION_COOKIE = "synthcxr_session"
PRE_CSRF_COOKIE = "synthcxr_csrf"
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}

templates = Jinja2Templates(directory=str(HERE / "templates"))


# --- dependencies -------------------------------------------------------------------------------


def get_db(request: Request) -> Iterator[Session]:
    """One session per request. Endpoints that write commit *before* returning: FastAPI may run
    this cleanup after the response is sent, and a browser following a redirect must already
    see the write."""
    with transaction(request.app.state.sessions) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def get_web_session(request: Request, db: SessionDep) -> WebSession | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    ws = db.scalar(select(WebSession).where(WebSession.token_hash == hash_token(request.app.state.secret, "session:" + token)))
    if ws is None or ws.expires_at < utcnow():
        return None
    return ws


WebSessionDep = Annotated[WebSession | None, Depends(get_web_session)]


def current_reader(ws: WebSessionDep) -> WebSession:
    if ws is None or ws.reader_id is None:
        raise HTTPException(401, "Please open the invite link you received to start or continue reading.")
    return ws


def current_admin(ws: WebSessionDep) -> WebSession:
    if ws is None:
        raise HTTPException(401, "Admin sign-in needed: open /admin/login.")
    if not ws.is_admin:
        raise HTTPException(403, "This page is for the study admin only.")
    return ws


CurrentReader = Annotated[WebSession, Depends(current_reader)]
CurrentAdmin = Annotated[WebSession, Depends(current_admin)]


def check_csrf(ws: WebSession, token: str) -> None:
    if not same(ws.csrf_token, token):
        raise HTTPException(403, "The form expired or came from another site (CSRF check failed). Reload the page and try again.")


def check_pre_csrf(request: Request, token: str) -> None:
    """Forms shown before sign-in use a double-submit cookie (no session exists yet)."""
    if not same(request.cookies.get(PRE_CSRF_COOKIE), token):
        raise HTTPException(403, "The form expired (CSRF check failed). Reload the page and try again.")


# --- helpers ----------------------------------------------------------------------------------------


def _render(request: Request, name: str, status_code: int = 200, **ctx) -> HTMLResponse:
    return templates.TemplateResponse(request, name, ctx, status_code=status_code)


def _render_pre(request: Request, name: str, **ctx) -> HTMLResponse:
    """A page with a pre-sign-in form: sets the double-submit CSRF cookie it carries."""
    token = request.cookies.get(PRE_CSRF_COOKIE) or new_token()
    response = _render(request, name, csrf_token=token, **ctx)
    response.set_cookie(PRE_CSRF_COOKIE, token, httponly=True, samesite="strict",
                        secure=request.app.state.settings.secure_cookies, path="/")
    return response


def _start_session(request: Request, db: Session, response: Response, *, reader_id: int | None, is_admin: bool,
                   not_after: dt.datetime | None = None) -> None:
    """`not_after` caps the session (an admin session ends when the token it came from expires)."""
    settings: StudySettings = request.app.state.settings
    token = new_token()
    now = utcnow()
    expires = now + dt.timedelta(days=settings.session_days)
    if not_after is not None:
        expires = min(expires, not_after)
    db.add(WebSession(token_hash=hash_token(request.app.state.secret, "session:" + token), csrf_token=new_token(),
                      reader_id=reader_id, is_admin=is_admin, expires_at=expires))
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", secure=settings.secure_cookies,
                        max_age=max(1, int((expires - now).total_seconds())), path="/")
    response.delete_cookie(PRE_CSRF_COOKIE, path="/")


def _client_key(request: Request) -> str:
    """The client address. X-Forwarded-For is believed only when the connection comes from one of
    `trusted_proxies`; then the client is the nearest hop that is not itself a trusted proxy (hops
    further left are whatever the client claimed)."""
    host = request.client.host if request.client else "unknown"
    proxies = request.app.state.proxies
    if not proxies or not _is_proxy(host, proxies):
        return host
    hops = [h.strip() for h in ",".join(request.headers.getlist("x-forwarded-for")).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_proxy(hop, proxies):
            return hop
    return hops[0] if hops else host


def _is_proxy(address: str, proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def _failed_attempt(request: Request, kind: str, token: str) -> None:
    """Count a wrong token against the client address *and* the token itself (many people share a
    hospital's address; a scanner may rotate addresses). Only wrong tokens are ever refused with
    HTTP 429: a correct token is checked first and always works."""
    keys = [f"addr:{_client_key(request)}", f"{kind}:{hash_token(request.app.state.secret, 'attempt:' + token)}"]
    limiter: AttemptLimiter = request.app.state.limiter
    waits = [w for w in (limiter.retry_after(k) for k in keys) if w is not None]
    if waits:
        wait = max(waits)
        raise HTTPException(429, f"Too many wrong tokens or links were tried. Try again in {wait} seconds "
                                 "(a correct link or token still works).", headers={"Retry-After": str(wait)})
    for key in keys:
        limiter.failed(key)


def _own_task(db: Session, ws: WebSession, public_id: str) -> Task:
    """The task if it belongs to this reader; otherwise 404 (never confirm another reader's ids)."""
    task = db.scalar(select(Task).where(Task.public_id == public_id))
    if task is None or task.reader_id != ws.reader_id:
        raise HTTPException(404, "Not found.")
    return task


# --- the app --------------------------------------------------------------------------------------


def create_app(settings: StudySettings | None = None) -> FastAPI:
    """Build the app for one database (migrated to the newest schema first)."""
    settings = settings or load_settings()
    service.ensure_db(settings.db)
    app = FastAPI(title="synthcxr reader study", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.sessions = session_factory(settings.db)
    app.state.limiter = AttemptLimiter(settings.login_attempts, settings.login_window_minutes * 60)
    app.state.proxies = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]
    with app.state.sessions() as s:
        app.state.secret = database_secret(s, settings.secret)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # noqa: ANN202 - starlette middleware
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers[key] = value
        for key in ("etag", "last-modified"):
            if key in response.headers:
                del response.headers[key]
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (301, 302, 303, 307):
            return RedirectResponse(exc.headers["location"], exc.status_code)
        response = _render(request, "message.html", status_code=exc.status_code, title=f"Error {exc.status_code}",
                           message=str(exc.detail),
                           admin_login=exc.status_code == 401 and request.url.path.startswith("/admin"))
        for key, value in (exc.headers or {}).items():  # e.g. Retry-After on 429
            response.headers[key] = value
        return response

    # -- public --------------------------------------------------------------------------------------

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # browsers ask for it on every page; avoid 404 noise

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, ws: WebSessionDep) -> Response:
        if ws is not None and ws.reader_id is not None:
            return RedirectResponse("/read", 303)
        if ws is not None and ws.is_admin:
            return RedirectResponse("/admin", 303)
        return _render(request, "message.html", title="Reader study",
                       message="Please open the personal invite link you received to start or continue reading.")

    def _invited_reader(request: Request, db: Session, token: str, ws: WebSession | None) -> Reader | Response:
        """The reader a still-unused link belongs to. A spent link is not a guess: it is never counted
        as a failure, and in the browser that used it (a valid session of that reader) it continues
        at /read."""
        reader = db.scalar(select(Reader).where(Reader.invite_hash == hash_token(app.state.secret, "invite:" + token)))
        if reader is not None and reader.invite_used_at is None:
            return reader
        if reader is not None:
            if ws is not None and ws.reader_id == reader.id:
                return RedirectResponse("/read", 303)
            raise HTTPException(404, "This invite link has already been used. If you started in another browser, "
                                     "continue there (at /read); otherwise ask the study admin for a new link.")
        _failed_attempt(request, "invite", token)
        raise HTTPException(404, "This invite link is not valid. Check that the whole link was copied, "
                                 "or ask the study admin for a new link.")

    @app.get("/invite/{token}", response_class=HTMLResponse)
    def invite_page(request: Request, token: str, db: SessionDep, ws: WebSessionDep) -> Response:
        reader = _invited_reader(request, db, token, ws)
        if isinstance(reader, Response):
            return reader
        q = QuestionsConfig.model_validate(reader.study.questions)
        done, total = service.progress(db, reader.id)
        return _render_pre(request, "invite.html", token=token, questions=q, total=total, done=done)

    @app.post("/invite")
    def invite_start(request: Request, db: SessionDep, ws: WebSessionDep, token: Annotated[str, Form()] = "",
                     csrf_token: Annotated[str, Form()] = "") -> Response:
        """The Start button posts the token in the form body, so this request line carries none."""
        return invite_accept(request, token, db, ws, csrf_token)

    @app.post("/invite/{token}")
    def invite_accept(request: Request, token: str, db: SessionDep, ws: WebSessionDep,
                      csrf_token: Annotated[str, Form()] = "") -> Response:
        """Kept for links opened by older pages; the access log redacts the path (see server.py)."""
        own = db.get(Reader, ws.reader_id) if ws is not None and ws.reader_id is not None else None
        if own is not None and own.invite_hash == hash_token(app.state.secret, "invite:" + token):
            return RedirectResponse("/read", 303)  # Start pressed again on an old page: just continue
        check_pre_csrf(request, csrf_token)
        reader = _invited_reader(request, db, token, ws)
        if isinstance(reader, Response):
            return reader
        # consume the link atomically: of two simultaneous clicks only one gets a session. The hash
        # stays, so the spent link is recognised later (never counted as a wrong one).
        used = db.execute(
            update(Reader).where(Reader.id == reader.id, Reader.invite_used_at.is_(None)).values(invite_used_at=utcnow())
        )
        if used.rowcount != 1:
            raise HTTPException(404, "This invite link has already been used.")
        response = RedirectResponse("/read", 303)
        _start_session(request, db, response, reader_id=reader.id, is_admin=False)
        db.commit()
        return response

    @app.post("/logout")
    def logout(request: Request, ws: WebSessionDep, db: SessionDep, csrf_token: Annotated[str, Form()] = "") -> Response:
        if ws is not None:
            check_csrf(ws, csrf_token)
            db.delete(ws)
            db.commit()
        response = RedirectResponse("/", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- reader ------------------------------------------------------------------------------------

    @app.get("/read", response_class=HTMLResponse)
    def read(request: Request, ws: CurrentReader, db: SessionDep) -> Response:
        reader = db.get(Reader, ws.reader_id)
        done, total = service.progress(db, reader.id)
        task = service.next_task(db, reader.id)
        if task is None:
            return _render(request, "done.html", total=total, csrf_token=ws.csrf_token)
        if task.shown_at is None:
            task.shown_at = utcnow()
            db.commit()
        q = QuestionsConfig.model_validate(reader.study.questions)
        calibration = None
        if task.phase == "calibration":
            n_calib = sum(t.phase == "calibration" for t in reader.tasks)
            calibration = {"number": task.position + 1, "total": n_calib}
        template = "read_pair.html" if task.image2_id is not None else "read.html"
        return _render(request, template, task=task, questions=q, done=done, total=total,
                       number=done + 1, csrf_token=ws.csrf_token, findings=FINDINGS, confidence_levels=CONFIDENCE_LEVELS,
                       error=request.query_params.get("error"), calibration=calibration)

    @app.get("/read/image/{public_id}")
    def read_image(public_id: str, ws: CurrentReader, db: SessionDep) -> Response:
        return Response(service.task_image(_own_task(db, ws, public_id)), media_type="image/png")

    @app.get("/read/image/{public_id}/right")
    def read_image_right(public_id: str, ws: CurrentReader, db: SessionDep) -> Response:
        task = _own_task(db, ws, public_id)
        if task.image2_id is None:
            raise HTTPException(404, "Not found.")
        return Response(service.task_image(task, "right"), media_type="image/png")

    @app.get("/read/feedback/{public_id}", response_class=HTMLResponse)
    def read_feedback(request: Request, public_id: str, ws: CurrentReader, db: SessionDep) -> Response:
        """The right answer after a calibration image; 404 for any other task (never a study image's truth)."""
        task = _own_task(db, ws, public_id)
        if task.phase != "calibration" or task.answer is None:
            raise HTTPException(404, "Not found.")
        n_calib = sum(t.phase == "calibration" for t in task.reader.tasks)
        return _render(request, "feedback.html", task=task, info=service.feedback(task),
                       number=task.position + 1, total=n_calib, last=task.position + 1 == n_calib)

    @app.post("/read/answer/{public_id}")
    def answer(
        request: Request, public_id: str, ws: CurrentReader, db: SessionDep,
        csrf_token: Annotated[str, Form()] = "", realism: Annotated[str, Form()] = "",
        choice: Annotated[str, Form()] = "", confidence: Annotated[str, Form()] = "",
        finding: Annotated[str, Form()] = "", comment: Annotated[str, Form()] = "",
        elapsed_ms: Annotated[str, Form()] = "", picked: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(ws, csrf_token)
        task = _own_task(db, ws, public_id)
        q = QuestionsConfig.model_validate(task.reader.study.questions)
        form = {"realism": realism, "choice": choice, "confidence": confidence, "finding": finding,
                "comment": comment, "elapsed_ms": elapsed_ms}
        form["picked"] = picked
        try:
            parsed = parse_answer(q, form, "paired" if task.image2_id is not None else "single")
        except AnswerRejected as exc:
            raise HTTPException(400, f"Answer not saved: {exc}. Go back and complete the form.") from None
        db.commit()  # end the read transaction before the write (see record_answer)
        if not service.record_answer(db, task, parsed) and not service.answer_matches(db, task, parsed):
            return _render(request, "message.html", status_code=409, title="Your first answer was kept",
                           message="You had already answered this image, probably in another tab or window. "
                                   "Your first answer was kept; this one was not saved.",
                           link=("/read", "Continue"))
        if task.phase == "calibration":
            return RedirectResponse(f"/read/feedback/{task.public_id}", 303)
        return RedirectResponse("/read", 303)

    @app.get("/pause", response_class=HTMLResponse)
    def pause(request: Request, ws: CurrentReader, db: SessionDep) -> Response:
        done, total = service.progress(db, ws.reader_id)
        return _render(request, "pause.html", done=done, total=total, csrf_token=ws.csrf_token)

    # -- admin ----------------------------------------------------------------------------------------

    @app.get("/admin/login", response_class=HTMLResponse)
    def admin_login_page(request: Request) -> Response:
        return _render_pre(request, "admin_login.html")

    @app.post("/admin/login")
    def admin_login(request: Request, db: SessionDep, token: Annotated[str, Form()] = "",
                    csrf_token: Annotated[str, Form()] = "") -> Response:
        check_pre_csrf(request, csrf_token)
        row = db.scalar(select(AdminToken).where(AdminToken.token_hash == hash_token(app.state.secret, "admin:" + token.strip())))
        expires = service.admin_token_expires(row, settings.admin_token_days) if row is not None else None
        if row is None or row.revoked or expires <= utcnow():
            _failed_attempt(request, "admin", token.strip())
            raise HTTPException(403, "Wrong, expired or revoked admin token. `synthcxr study serve --new-admin-token` "
                                     "or `synthcxr study admin-token` prints a new one.")
        response = RedirectResponse("/admin", 303)
        _start_session(request, db, response, reader_id=None, is_admin=True, not_after=expires)
        db.commit()
        return response

    @app.get("/admin", response_class=HTMLResponse)
    def admin_home(request: Request, ws: CurrentAdmin) -> Response:
        return _render(request, "admin.html", studies=service.study_status(settings.db), csrf_token=ws.csrf_token)

    app.state.analysis = {}  # study name -> (answers analysed, result, {plot file: PNG bytes})
    app.state.analysis_lock = threading.Lock()

    def _analysis(name: str, refresh: bool = False) -> tuple[dict | None, dict[str, bytes]]:
        """The dashboard's analysis: computed on first view and when the admin presses Refresh
        (a full analysis takes seconds, so it is not redone on every page view). One at a time:
        matplotlib's pyplot is not thread-safe, and parallel plot requests need one result."""
        with app.state.analysis_lock:
            return _analysis_locked(name, refresh)

    def _analysis_locked(name: str, refresh: bool) -> tuple[dict | None, dict[str, bytes]]:
        cached = app.state.analysis.get(name)
        if cached is not None and not refresh:
            return cached[1], cached[2]
        rows = service.ratings_table(settings.db, name)
        if not [r for r in rows if r.get("phase") != "calibration"]:
            return None, {}
        import tempfile

        from synthcxr.study.analysis import analyze, write_outputs

        try:
            result = analyze(rows, n_boot=1000)
            result["generated_at"] = utcnow().strftime("%Y-%m-%d %H:%M:%S UTC")
            with tempfile.TemporaryDirectory() as tmp:
                written = write_outputs(result, rows, Path(tmp))
                plots = {p.name: p.read_bytes() for p in written if p.suffix == ".png"}
        except Exception as exc:  # noqa: BLE001 - the progress table must stay usable
            log.exception("analysis of study %r failed", name)
            return {"error": f"{type(exc).__name__}: {exc}"}, {}
        app.state.analysis[name] = (len(rows), result, plots)
        return result, plots

    def _study_page(request: Request, ws: WebSession, name: str, new_link: tuple[str, str] | None = None,
                    refresh: bool = False) -> Response:
        status = service.study_status(settings.db, name)[0]
        with app.state.sessions() as s:
            study = service.get_study(s, name)
            groups: dict[str, int] = {}
            for img in study.images:
                if img.role == "study":
                    groups[img.model] = groups.get(img.model, 0) + 1
            blinding = study.blinding
            design = {"design": study.design, **(study.options or {})}
        result, plots = _analysis(name, refresh)
        return _render(request, "admin_study.html", study=status, groups=groups, new_link=new_link,
                       blinding=blinding, csrf_token=ws.csrf_token, design=design, analysis=result,
                       plots=sorted(plots))

    @app.get("/admin/study/{name}", response_class=HTMLResponse)
    def admin_study(request: Request, name: str, ws: CurrentAdmin, refresh: str = "") -> Response:
        return _study_page(request, ws, name, refresh=refresh == "1")

    @app.get("/admin/study/{name}/status.json")
    def admin_status(name: str, ws: CurrentAdmin) -> Response:
        """Progress per reader, polled by the dashboard (live progress without reloading)."""
        import json

        return Response(json.dumps(service.study_status(settings.db, name)[0]), media_type="application/json")

    @app.get("/admin/study/{name}/plot/{file}")
    def admin_plot(name: str, file: str, ws: CurrentAdmin) -> Response:
        _, plots = _analysis(name)
        if file not in plots:
            raise HTTPException(404, "No such plot (yet): refresh the analysis.")
        return Response(plots[file], media_type="image/png")

    @app.get("/admin/study/{name}/reader/{reader_name}", response_class=HTMLResponse)
    def admin_reader(request: Request, name: str, reader_name: str, ws: CurrentAdmin) -> Response:
        """One reader: progress, their statistics and every answer (unblinded; admin only)."""
        status = service.study_status(settings.db, name)[0]
        mine = [r for r in status["readers"] if r["reader"] == reader_name]
        if not mine:
            raise HTTPException(404, f"Study {name!r} has no reader {reader_name!r}.")
        rows = [r for r in service.ratings_table(settings.db, name) if r["reader"] == reader_name]
        result, _ = _analysis(name)
        stats = None
        if result is not None:
            table = (result.get("paired") or {}).get("readers") or result.get("readers") or []
            stats = next((r for r in table if r.get("reader") == reader_name), None)
        mrmc = {m["model"]: m["per_reader"].get(reader_name) for m in (result or {}).get("mrmc", {}).get("models", [])}
        return _render(request, "admin_reader.html", study=name, reader=mine[0], rows=rows, stats=stats, mrmc=mrmc)

    @app.get("/admin/study/{name}/mrmc.csv")
    def admin_export_mrmc(name: str, ws: CurrentAdmin) -> Response:
        return Response(service.mrmc_csv(service.ratings_table(settings.db, name)), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}-mrmc.csv"'})

    @app.post("/admin/study/{name}/readers", response_class=HTMLResponse)
    def admin_add_reader(request: Request, name: str, ws: CurrentAdmin, csrf_token: Annotated[str, Form()] = "",
                         reader_name: Annotated[str, Form()] = "") -> Response:
        check_csrf(ws, csrf_token)
        link = service.add_reader(settings.db, name, reader_name.strip() or None, base_url=settings.base_url)
        return _study_page(request, ws, name, new_link=(reader_name.strip() or "new reader", link))

    @app.get("/admin/study/{name}/readers/{reader_name}/reissue", response_class=HTMLResponse)
    def admin_reissue_ask(request: Request, name: str, reader_name: str, ws: CurrentAdmin) -> Response:
        """A new link cuts the reader's current link and browser off: ask first."""
        readers = [r["reader"] for r in service.study_status(settings.db, name)[0]["readers"]]
        if reader_name not in readers:
            raise HTTPException(404, f"Study {name!r} has no reader {reader_name!r}.")
        return _render(request, "admin_reissue.html", study=name, reader=reader_name, csrf_token=ws.csrf_token)

    @app.post("/admin/study/{name}/readers/{reader_name}/reissue", response_class=HTMLResponse)
    def admin_reissue(request: Request, name: str, reader_name: str, ws: CurrentAdmin,
                      csrf_token: Annotated[str, Form()] = "", confirm: Annotated[str, Form()] = "") -> Response:
        check_csrf(ws, csrf_token)
        if confirm != "yes":
            return admin_reissue_ask(request, name, reader_name, ws)
        link = service.reissue_invite(settings.db, name, reader_name, base_url=settings.base_url)
        return _study_page(request, ws, name, new_link=(reader_name, link))

    @app.get("/admin/study/{name}/export.csv")
    def admin_export(name: str, ws: CurrentAdmin) -> Response:
        csv_text = service.ratings_csv(service.ratings_table(settings.db, name))
        return Response(csv_text, media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}-ratings.csv"'})

    @app.get("/admin/study/{name}/analysis.json")
    def admin_analysis(name: str, ws: CurrentAdmin) -> Response:
        from synthcxr.study.analysis import analyze

        rows = service.ratings_table(settings.db, name)
        if not rows:
            raise HTTPException(409, "No answers yet.")
        import json

        return Response(json.dumps(analyze(rows), indent=2, default=str), media_type="application/json")

    @app.exception_handler(StudyError)
    async def study_error(request: Request, exc: StudyError) -> Response:
        status = 404 if "no study called" in exc.message or "has no reader" in exc.message else 400
        return _render(request, "message.html", status_code=status, title="Cannot do that", message=exc.message)

    return app
