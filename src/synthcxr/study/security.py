"""Tokens for invites, admin logins, sessions and CSRF.

Only keyed hashes (HMAC-SHA256 with the per-database secret) of tokens are stored, so a copy of
the database does not let anyone log in. Tokens are random 256-bit values (`secrets`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from synthcxr.study.db import AppSetting

SECRET_KEY = "secret_key"


def new_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def opaque_id() -> str:
    """Random ids for images and tasks: 128 bits, no order, no structure."""
    return secrets.token_urlsafe(16)


def hash_token(secret: str, token: str) -> str:
    return hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def database_secret(session: Session, configured: str | None) -> str:
    """The configured secret, else this database's own, generated once and stored in it.

    May commit `session` (the new secret must be durable before any token is hashed with it)."""
    if configured:
        return configured
    row = session.scalar(select(AppSetting).where(AppSetting.key == SECRET_KEY))
    if row is not None:
        return row.value
    try:
        session.add(AppSetting(key=SECRET_KEY, value=new_token(48)))
        session.commit()
    except IntegrityError:  # another process created it first: use theirs
        session.rollback()
    return session.scalar(select(AppSetting.value).where(AppSetting.key == SECRET_KEY))
