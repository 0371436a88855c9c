"""Study settings from the environment (or CLI flags), validated before anything starts.

There is no default secret: unless `SYNTHCXR_STUDY_SECRET` is set, a random one is generated the
first time a database is used and stored in it, so every deployment has its own key.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from synthcxr.config import StrictModel, format_validation_error

ENV_PREFIX = "SYNTHCXR_STUDY_"
DEFAULT_DIR = Path("synthcxr-study")


class StudySettings(StrictModel):
    """Where the study lives and how the server behaves. Every field has an env variable
    `SYNTHCXR_STUDY_<FIELD>` (e.g. `SYNTHCXR_STUDY_DB=postgresql+psycopg://...`)."""

    db: str = f"sqlite:///{DEFAULT_DIR / 'study.sqlite3'}"
    """SQLAlchemy URL of the study database (SQLite file by default, PostgreSQL works too)."""
    dir: Path = DEFAULT_DIR
    """Folder holding the blinded image copies (one subfolder per study, opaque file names)."""
    secret: str | None = None
    """Key for token hashing and CSRF; None = generate once per database and keep it there."""
    secure_cookies: bool = False
    """Mark cookies `Secure` (set when the server is behind HTTPS)."""
    base_url: str = "http://127.0.0.1:8000"
    """Public address readers use; invite links are printed with it."""
    session_days: float = 30.0
    """How long a reader's browser session stays valid (readers may pause for days)."""
    admin_token_days: float = 7.0
    """How long an admin token stays valid after it is made (admin sessions end with it)."""
    login_attempts: int = 10
    """Failed admin-token or invite-link attempts allowed per client address per window; 0 = no limit."""
    login_window_minutes: float = 15.0
    """The window for `login_attempts`; a blocked client gets HTTP 429 with Retry-After."""
    trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses or networks of reverse proxies whose X-Forwarded-For is believed (comma-separated
    in the environment, e.g. `127.0.0.1,10.0.0.0/8`); empty = the connecting address is the client."""

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: object) -> object:
        import ipaddress

        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, list):
            for item in items:
                try:
                    ipaddress.ip_network(str(item), strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP address or network (e.g. 10.0.0.1 or 10.0.0.0/8)") from None
        return items

    @field_validator("session_days", "admin_token_days", "login_window_minutes")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("login_attempts")
    @classmethod
    def _attempts(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (no limit) or more")
        return value

    @field_validator("db")
    @classmethod
    def _db_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(value)
        except Exception as exc:  # noqa: BLE001 - sqlalchemy raises several types
            raise ValueError(f"not a database URL ({exc}); use sqlite:///path.db or postgresql://...") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {url.get_backend_name()!r}; use sqlite:///path.db or postgresql://...")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 32:
            raise ValueError("must be at least 32 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


def load_settings(**overrides: object) -> StudySettings:
    """Environment first, then explicit (non-None) overrides such as CLI flags."""
    data: dict[str, object] = {}
    for name in StudySettings.model_fields:
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env is not None:
            data[name] = env
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return StudySettings.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(StudySettings, exc, f"{ENV_PREFIX}* environment / study options") from None
