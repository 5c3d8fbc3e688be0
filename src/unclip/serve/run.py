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
    """Serve until interrupted. Ctrl-C stops the worker at once, after its current sampling step,
    so every request still open is answered 503 (retry) in the API's error JSON: left running, the
    requests outlived uvicorn's grace period and were cut off with a traceback and a plain-text 500."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # from another thread: the signal may land while this (the event loop's) thread holds the
            # worker's lock; the lifespan's own stop then joins the worker
            threading.Thread(target=app.state.worker.stop, kwargs={"timeout": 0}, daemon=True).start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the captured Ctrl-C again once it has shut down, as uvicorn.run expects
        pass
    if not server.started:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE; it has logged why


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
