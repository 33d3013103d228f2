"""What answers on the service's port while `capeen serve` loads the model, before uvicorn listens.

The model is loaded before uvicorn starts, so that a bad checkpoint or an unavailable device is one line and
exit status 2 (service.cli), and uvicorn binds its port only once the app has started. Loading takes seconds
on a CPU and can take minutes on a GPU host; probes would meanwhile find nothing listening, and a liveness
probe would restart the service before it is ever ready. So a small responder holds the port during the
load and answers as the app does before it is ready: `GET /healthz` 200, anything else 503 `not_ready` with
Retry-After. Then it hands the listening socket to uvicorn, with the connections waiting on it: none is refused
or dropped at the hand-over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

# read off before answering (within the handler's timeout): a client still sending when the connection closes
# may see it reset instead of reading the 503
_DRAINED_BODY_BYTES = 64 << 20


class _Handler(BaseHTTPRequestHandler):
    timeout = 5.0  # seconds a connection may take to send its request: an idle one must not hold a thread

    def _answer(self) -> None:
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= _DRAINED_BODY_BYTES:
            with contextlib.suppress(OSError):  # a client too slow for the timeout: answer all the same
                self.rfile.read(int(length))
        if self.command == "GET" and self.path.split("?", 1)[0] == "/healthz":
            status, body = 200, {"status": "ok"}
        else:
            status, body = 503, {"error": "not_ready", "detail": "the model is still loading"}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status == 503:
            self.send_header("Retry-After", "1")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # a client that went away or timed out: nothing to say to it
            super().handle()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("while loading: %s", format % args)


@contextmanager
def answering_while_loading(listeners: list[socket.socket]) -> Iterator[None]:
    """Answer on `listeners` (bound and listening) for the duration of the block; then stop accepting, and leave
    the sockets open, with the connections that wait in their backlogs, for uvicorn. A connection the responder
    took and that is still open then is left to its handler's timeout."""
    servers = []
    for listener in listeners:
        server_class = type("LoadingServer", (ThreadingHTTPServer,), {"address_family": listener.family,
                                                                       "daemon_threads": True})
        server = server_class(listener.getsockname(), _Handler, bind_and_activate=False)
        server.socket.close()  # the one it made for itself: it serves on the service's own
        server.socket = listener
        servers.append(server)
    threads = [threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                name="loading-responder") for server in servers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for server in servers:
            server.shutdown()  # returns once serve_forever has stopped: no connection is accepted after it
        for thread in threads:
            thread.join()
