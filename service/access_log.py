"""uvicorn's access log, without the requests that platforms send every few seconds.

A container's health check asks `/readyz` every 15 s and Prometheus scrapes `/metrics` every 5 s: left in,
those lines are most of what `docker compose logs capeen` shows on a quiet service. `CAPEEN_ACCESS_LOG`
chooses: `requests` (the default) drops the successful probes and scrapes and keeps every other line (the
captions, every refusal, a probe that failed); `all` keeps them too; `off` writes none, for a service at
hundreds of captions a second whose log would otherwise grow by gigabytes a day.
"""

from __future__ import annotations

import logging
from typing import Literal

AccessLog = Literal["requests", "all", "off"]
ACCESS_LOGGER = "uvicorn.access"
ROUTINE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RoutineRequestFilter(logging.Filter):
    """Drops uvicorn's access lines of a successful GET of a probe or the metrics (with any query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 5):  # (client, method, path, HTTP version, status)
            return True
        _, method, path, _, status = args
        routine = method == "GET" and str(path).partition("?")[0] in ROUTINE_PATHS
        return not (routine and isinstance(status, int) and 200 <= status < 300)


def configure_access_log(mode: AccessLog) -> None:
    """Filter the access logger for `mode`; `off` is uvicorn's own `access_log=False`."""
    logger = logging.getLogger(ACCESS_LOGGER)
    for existing in [f for f in logger.filters if isinstance(f, RoutineRequestFilter)]:
        logger.removeFilter(existing)
    if mode == "requests":
        logger.addFilter(RoutineRequestFilter())
