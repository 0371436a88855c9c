"""Run the study app with uvicorn: in the foreground (`study serve`) or in a background thread
(browser tests, the load benchmark)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from synthcxr.study.settings import StudySettings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve(settings: StudySettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    from synthcxr.study.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", proxy_headers=True)


@contextmanager
def background_server(settings: StudySettings, host: str = "127.0.0.1", port: int | None = None,
                      timeout: float = 30.0) -> Iterator[str]:
    """Start the app on `host` (loopback by default) in a thread; yields its base URL, stops on exit."""
    import uvicorn

    from synthcxr.study.app import create_app

    port = port or free_port(host)
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
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
