"""Connections that never finish their request headers are closed.

uvicorn waits for a request's headers without a deadline: a connection that sends nothing, or half a request
line, holds its socket for as long as the client likes (its keep-alive timeout runs only between requests,
and the first byte of the next request stops it). A few thousand such connections (slowloris) use up the
process's file descriptors, and then nobody is served. This protocol gives every request's headers
`header_timeout_s`, from the connection's start or from the previous response, as nginx's
client_header_timeout does. Bodies have their deadline in service.middleware.BodyLimit.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus the deadline for request headers (see the module docstring)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._follow_request_state()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once
        self._follow_request_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _follow_request_state(self) -> None:
        """The deadline runs while no request is in progress (its headers still to come), and only then."""
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if not waiting_for_headers or self.transport.is_closing():
            self._cancel_header_deadline()
        elif self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_late)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def http_protocol(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class to give uvicorn (its `http` setting), with this deadline for request headers."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
