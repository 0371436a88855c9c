"""Database tables of the reader study (SQLAlchemy 2.0) and the engine/session setup.

The schema itself is created only by the Alembic migrations shipped in `study/migrations`, so a
SQLite file and a PostgreSQL database evolve the same way. Nothing here is SQLite-specific except
the connection pragmas, which are applied only when the URL is SQLite.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from synthcxr.errors import StudyError


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class AppSetting(Base):
    """Per-database key/value settings (the generated secret lives here)."""

    __tablename__ = "app_setting"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class AdminToken(Base):
    """Admin login tokens; only their keyed hash is stored."""

    __tablename__ = "admin_token"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    seed: Mapped[int] = mapped_column(Integer)
    image_dir: Mapped[str] = mapped_column(Text)
    image_size: Mapped[int] = mapped_column(Integer)
    questions: Mapped[dict] = mapped_column(JSON)
    repeats: Mapped[int] = mapped_column(Integer, default=0)
    order_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """Random secret the readers' orders are derived from (never shown; orders are stored as positions)."""
    blinding: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    """Source sizes/framing per group and the leak check measured at creation."""
    design: Mapped[str] = mapped_column(String(16), default="single", server_default="single")
    """"single" (one image, rated) or "paired" (a real and a synthetic image: which is synthetic?)."""
    options: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    """Design options: calibration size, counterbalancing, the fixed pairs of a paired study (never shown)."""
    images: Mapped[list[Image]] = relationship(back_populates="study")
    readers: Mapped[list[Reader]] = relationship(back_populates="study", order_by="Reader.id")


class Image(Base):
    """One blinded image. `id` is a random opaque token; the stored file is `<image_dir>/<id>.png`."""

    __tablename__ = "image"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # "real" | "synthetic"
    model: Mapped[str] = mapped_column(String(200))  # group name; "real" for controls
    intended_label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    original_path: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16), default="study", server_default="study")
    """"study" or "calibration" (shown with feedback before the study, never analysed)."""
    study: Mapped[Study] = relationship(back_populates="images")


class Reader(Base):
    __tablename__ = "reader"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    invite_hash: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    invite_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    study: Mapped[Study] = relationship(back_populates="readers")
    tasks: Mapped[list[Task]] = relationship(back_populates="reader", order_by="Task.position")
    __table_args__ = (UniqueConstraint("study_id", "name", name="uq_reader_study_name"),)


class Task(Base):
    """One image shown to one reader at one position; `public_id` is what URLs carry."""

    __tablename__ = "task"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(64), unique=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("reader.id"), index=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("image.id"))
    position: Mapped[int] = mapped_column(Integer)
    repeat_of: Mapped[int | None] = mapped_column(ForeignKey("task.id"), nullable=True)
    shown_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    phase: Mapped[str] = mapped_column(String(16), default="main", server_default="main")
    """"calibration" (feedback after the answer, excluded from analysis) or "main"."""
    image2_id: Mapped[str | None] = mapped_column(ForeignKey("image.id"), nullable=True)
    """Paired design: `image_id` is shown on the left, `image2_id` on the right."""
    block: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """The model block of a counterbalanced study."""
    reader: Mapped[Reader] = relationship(back_populates="tasks")
    image: Mapped[Image] = relationship(foreign_keys=[image_id])
    image2: Mapped[Image | None] = relationship(foreign_keys=[image2_id])
    answer: Mapped[Answer | None] = relationship(back_populates="task", uselist=False)
    __table_args__ = (UniqueConstraint("reader_id", "position", name="uq_task_reader_position"),)


class Answer(Base):
    """At most one answer per task (unique `task_id`): double submits and two tabs cannot duplicate."""

    __tablename__ = "answer"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("task.id"), unique=True)
    realism: Mapped[int | None] = mapped_column(Integer, nullable=True)
    judged_real: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    confidence: Mapped[int | None] = mapped_column(Integer, nullable=True)
    picked: Mapped[str | None] = mapped_column(String(8), nullable=True)
    """Paired design: the side the reader called synthetic ("left" / "right")."""
    finding: Mapped[str | None] = mapped_column(String(32), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    client_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    server_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    answered_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    task: Mapped[Task] = relationship(back_populates="answer")


class WebSession(Base):
    """A browser session (admin or one reader); the cookie holds a token, the table its hash."""

    __tablename__ = "web_session"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(128))
    reader_id: Mapped[int | None] = mapped_column(ForeignKey("reader.id"), nullable=True, index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    reader: Mapped[Reader | None] = relationship()


# --- engine / sessions -------------------------------------------------------------------------

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
    """WAL lets readers proceed during a write; busy_timeout makes concurrent writers wait, not fail."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def get_engine(db_url: str) -> Engine:
    """One engine per URL per process (pooled connections are shared by all requests)."""
    with _engines_lock:
        engine = _engines.get(db_url)
        if engine is None:
            engine = _make_engine(db_url)
            _engines[db_url] = engine
        return engine


def _make_engine(db_url: str) -> Engine:
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    if url.drivername == "postgresql":  # plain postgresql:// means psycopg 3 (the `postgres` extra)
        url = url.set(drivername="postgresql+psycopg")
    kwargs: dict = {"pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    if url.get_backend_name() != "sqlite" or (url.database and url.database != ":memory:"):
        kwargs.update(pool_size=20, max_overflow=10)  # one connection per concurrent request thread
    try:
        engine = create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        raise StudyError(
            f"the database driver for {url.drivername} is not installed ({exc.name})",
            fix="pip install 'synthcxr[postgres]' for PostgreSQL",
        ) from None
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def dispose_engine(db_url: str) -> None:
    """Close pooled connections (tests simulate a server restart with this)."""
    with _engines_lock:
        engine = _engines.pop(db_url, None)
    if engine is not None:
        engine.dispose()


def session_factory(db_url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(db_url), expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def session_scope(db_url: str) -> Iterator[Session]:
    """One transaction on the database at `db_url`."""
    with transaction(session_factory(db_url)) as session:
        yield session


def upgrade(db_url: str) -> None:
    """Bring the schema to the newest migration (safe to call on every start)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    engine = get_engine(db_url)
    try:
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    except Exception as exc:
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, OperationalError):
            raise StudyError(f"cannot open the study database: {exc.orig}", fix="check --db / SYNTHCXR_STUDY_DB") from None
        raise
