"""Serving an application: in the foreground (`unclip serve`) or from a background thread.

`running(app)` is how tests and bench/bench_server.py get a live server on loopback: uvicorn
in a thread of the calling process, on a free port, stopped (and its worker with it) on exit.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(app, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C stops the worker after its current sampling step)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@contextmanager
def running(app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
            timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` from a background thread; yields its base URL, e.g. http://127.0.0.1:41234."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                          timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="unclip-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
