"""Run the study app with uvicorn: in the foreground (`study serve`) or in a background thread
(browser tests, the load benchmark)."""

from __future__ import annotations

import copy
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from synthcxr.study.settings import StudySettings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# one-time invite tokens travel in the URL path; nothing that logs a request line may keep them
_TOKEN_PATH = re.compile(r"(/invite/)[^/?#\s\"']+")
REDACTED = "[redacted]"


def redact_tokens(text: str) -> str:
    """`GET /invite/<token> HTTP/1.1` -> `GET /invite/[redacted] HTTP/1.1`."""
    return _TOKEN_PATH.sub(r"\g<1>" + REDACTED, text)


class RedactTokensFilter(logging.Filter):
    """Rewrites a log record so no invite token reaches any handler (uvicorn's access log passes the
    path as one of `record.args`; other loggers may put it in the message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_tokens(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's default logging setup with the token filter on its access and error loggers."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokensFilter}
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        config["loggers"].setdefault(name, {})["filters"] = ["redact_tokens"]
    for handler in config["handlers"].values():  # also records that reach them by propagation
        handler["filters"] = ["redact_tokens"]
    return config


def serve(settings: StudySettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    from synthcxr.study.app import create_app

    # the app reads X-Forwarded-For itself, only from `trusted_proxies` (uvicorn would believe any
    # loopback peer by default)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", proxy_headers=False,
                log_config=log_config())


@contextmanager
def background_server(settings: StudySettings, host: str = "127.0.0.1", port: int | None = None,
                      timeout: float = 30.0, access_log: bool = False) -> Iterator[str]:
    """Start the app on `host` (loopback by default) in a thread; yields its base URL, stops on exit.
    With `access_log`, requests are logged exactly as `study serve` logs them (tokens redacted)."""
    import uvicorn

    from synthcxr.study.app import create_app

    port = port or free_port(host)
    extra: dict[str, Any] = {"log_config": log_config(), "log_level": "info"} if access_log else {"log_level": "warning"}
    config = uvicorn.Config(create_app(settings), host=host, port=port, access_log=access_log, proxy_headers=False,
                            **extra)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="study-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"study server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
