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

import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

_DRAINED_BODY_BYTES = 1 << 20  # read off before answering, so that a small upload's client sees the 503


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= _DRAINED_BODY_BYTES:
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

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("while loading: %s", format % args)


@contextmanager
def answering_while_loading(listener: socket.socket) -> Iterator[None]:
    """Answer on `listener` (bound and listening) for the duration of the block; then stop accepting, and leave
    the socket open, with the connections that wait in its backlog, for uvicorn."""
    server_class = type("LoadingServer", (ThreadingHTTPServer,), {"address_family": listener.family,
                                                                   "daemon_threads": True})
    server = server_class(listener.getsockname(), _Handler, bind_and_activate=False)
    server.socket.close()  # the one it made for itself: it serves on the service's own
    server.socket = listener
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="loading-responder",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()  # returns once serve_forever has stopped: no connection is accepted after it
        thread.join()
