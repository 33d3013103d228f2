"""Three pure ASGI middlewares (not BaseHTTPMiddleware, which would buffer and detach the request body).

* `RequestContext`: gives each request an id and an arrival time (its deadline and `total_ms` start there),
  echoes the id in `X-Request-ID`, and counts and times every response by route template.
* `BodyLimit`: refuses a body over the limit without reading it: a too large Content-Length fails the first
  read, and a body without one fails as soon as the bytes received pass the limit. A body that has not
  arrived by the request's deadline gets 408: a client that stalls mid-upload would otherwise hold its
  connection, and its memory, for as long as it likes.
* `CompleteMultipart`: refuses (400) a multipart body that ends before its closing boundary. The form parser
  drops an unfinished last part without a word, so an image cut short would go missing from the answer.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Mapping

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError
from service.metrics import HttpMetrics

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(headers: Headers) -> str:
    """The client's X-Request-ID when it is a sane token (for tracing across services), else a new one."""
    given = headers.get("x-request-id", "")
    return given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(Headers(scope=scope))
        scope.setdefault("state", {}).update(request_id=request_id, started=started)
        status = 500  # what the client gets if the app raises before responding

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = _route_label(scope)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.duration.labels(route=route, status=str(status)).observe(time.perf_counter() - started)


def _route_label(scope: Scope) -> str:
    """The route's template (bounded label values), or `unmatched` for a path no route serves."""
    route = scope.get("route")
    if route is not None:
        return route.path
    if scope.get("endpoint") is not None and not scope.get("path_params"):
        return scope["path"]  # FastAPI's own /openapi.json and /docs: plain routes, whose paths are templates
    return "unmatched"


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int, detail: str, timeout_s: float,
                 path_limits: Mapping[str, tuple[int, str]] | None = None) -> None:
        """`path_limits`: a limit and its detail for the paths that take more than `limit` bytes."""
        self.app = app
        self.limit = limit
        self.detail = detail
        self.timeout_s = timeout_s  # from the request's arrival, as its deadline
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, detail = self.path_limits.get(scope["path"], (self.limit, self.detail))
        declared = Headers(scope=scope).get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        received = 0
        complete = False
        arrival = scope.get("state", {}).get("started", time.perf_counter())

        async def limited_receive() -> Message:
            # Raised inside the route's body parsing, which FastAPI passes on as an HTTP error: a JSON 413.
            nonlocal received, complete
            if too_large:
                raise ServiceError(413, "upload_too_large", detail)
            if complete:  # after the body, receive() waits for the client to leave, for as long as that takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), arrival + self.timeout_s - time.perf_counter())
            except TimeoutError:
                raise ServiceError(408, "upload_timeout", f"the upload did not arrive within {self.timeout_s:g} s "
                                                          "(CAPEEN_REQUEST_TIMEOUT_S)") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > limit:
                raise ServiceError(413, "upload_too_large", detail)
            return message

        await self.app(scope, limited_receive, send)


class CompleteMultipart:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type, options = parse_options_header(Headers(scope=scope).get("content-type", ""))
        boundary = options.get(b"boundary")
        if content_type != b"multipart/form-data" or not boundary:
            await self.app(scope, receive, send)  # not a form, or one the parser refuses itself
            return
        # the delimiter starts a line, so the same bytes inside an image are not one
        closing = b"\r\n--" + boundary + b"--"
        # the end of the body so far, long enough to hold a delimiter split between two reads; at first, as if a
        # line had just ended (a form without parts is its closing delimiter alone)
        tail = b"\r\n"
        closed = False

        async def checked_receive() -> Message:
            nonlocal tail, closed
            message = await receive()
            if message["type"] != "http.request" or closed:  # a client that left is counted as such, not here
                return message
            body = message.get("body", b"")
            closed = closing in tail + body[:len(closing)] or closing in body
            tail = (tail + body[-len(closing):])[-len(closing):]
            if not closed and not message.get("more_body", False):
                raise ServiceError(400, "bad_request", "the multipart body ends before its closing boundary "
                                                       f"(--{boundary.decode('latin-1')}--): it was cut short")
            return message

        await self.app(scope, checked_receive, send)
