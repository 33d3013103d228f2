"""`capeen serve`: flags over `CAPEEN_*` settings, the checkpoint loaded up front, then one uvicorn process.

The model is loaded before uvicorn starts so that a bad checkpoint or an unavailable device is one line on
stderr and exit status 2 (`UserError`), not a lifespan traceback; meanwhile service.loading answers probes
on the port. One uvicorn process only: the batcher is
what shares the model between concurrent requests, and more processes would each hold a copy and fight for
it. The model itself runs in a child process of that one (service.engine_process, unless
CAPEEN_ENGINE_PROCESS=false), or in several (CAPEEN_ENGINES), each with its own copy of the model.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

from capeen.errors import UserError
from models.interrupts import termination_interrupts
from service.engine_spawn import SpawnedEngine, engine_options, spawn_engine
from service.log_setup import configure_logging

if TYPE_CHECKING:
    from service.settings import Settings

_FLAGS = ("host", "port", "checkpoint", "device", "half", "kv_fill", "engines")
# uvicorn's grace period for in-flight requests at shutdown, beyond the request deadline
_SHUTDOWN_GRACE_S = 5.0


def _setting_name(loc: tuple, flags: dict[str, object]) -> str:
    """How the user gave a setting: its flag when one was given, else its variable."""
    field = ".".join(map(str, loc))
    return f"--{field.replace('_', '-')}" if field in flags else f"CAPEEN_{field.upper()}"


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    from pydantic import ValidationError

    from service.settings import Settings

    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        # a field's error names its variable; one about several settings together names them in its message
        messages = [(e["loc"], e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        problems = "; ".join(f"{_setting_name(loc, overrides)}: {msg}" if loc else msg for loc, msg in messages)
        raise UserError(f"bad setting: {problems}") from None


def _listening_sockets(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """The service's listening sockets, one per address `host` resolves to (as asyncio, and so uvicorn, would
    listen), bound now, so that a port in use or an unknown host is one line before the model loads. They are
    held from then on: first by service.loading's responder, then by uvicorn, so that no connection is refused
    or dropped when one hands them to the other (2048: uvicorn's own backlog)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # each address once
            listener = socket.socket(family, kind, proto)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            if family == socket.AF_INET6:  # as asyncio does: `::` is IPv6 only, IPv4 has its own socket
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(address)
            listener.listen(backlog)
    except OSError as exc:
        for listener in listeners:
            listener.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listeners


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if listener.family == socket.AF_INET6 else f"http://{host}:{port}"


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def serve_main(args: argparse.Namespace) -> int:
    settings = load_settings(args)  # before importing torch: a bad setting is reported at once
    configure_logging(settings.log_level)
    listeners = _listening_sockets(settings.host, settings.port)
    try:
        from service.loading import answering_while_loading

        spawned: list[SpawnedEngine] = []
        try:
            # until uvicorn takes over, SIGTERM and SIGHUP stop the start as Ctrl-C does, engines included
            with termination_interrupts():
                # the engine processes load the model while this one imports torch and the web stack
                # (BENCHMARKS.md)
                for index in range(settings.engines if settings.engine_process else 0):
                    spawned.append(spawn_engine(engine_options(settings, index)))
                with answering_while_loading(listeners):  # probes get /healthz 200 and /readyz 503 meanwhile
                    app = _loaded_app(settings, spawned)
        except BaseException:  # a failed start, Ctrl-C, SIGTERM: no engine is left loading on its own
            for child in spawned:
                child.discard()
            raise
        import uvicorn

        from service.access_log import configure_access_log
        from service.connections import http_protocol

        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                http=http_protocol(settings.header_timeout_s), access_log=settings.access_log != "off",
                                timeout_graceful_shutdown=int(settings.request_timeout_s + _SHUTDOWN_GRACE_S))
        configure_access_log(settings.access_log)  # once uvicorn has set up its loggers
        server = uvicorn.Server(config)
        # uvicorn names the address only when it binds it itself
        logging.getLogger("service").info("serving on %s", ", ".join(_url(listener) for listener in listeners))
        try:
            server.run(sockets=listeners)
        except KeyboardInterrupt:  # Ctrl-C after a graceful shutdown: uvicorn raises it again once done
            pass
    finally:
        for listener in listeners:
            listener.close()
    return 0


def _loaded_app(settings: Settings, spawned: list[SpawnedEngine]):
    """The app, with its engines (`spawned`, unless they run in this process) loaded and warmed: a bad
    checkpoint or device is a UserError."""
    from models.checkpoint import CheckpointError
    from service.app import create_app
    from service.engine_process import EngineStartError
    from service.runtime import load_engines

    if settings.admin_token is None and not _loopback(settings.host):
        logging.getLogger("service").warning(
            "listening on %s without CAPEEN_ADMIN_TOKEN: anyone who reaches the port can reset what the bandit "
            "learnt (POST /v1/bandit/reset)", settings.host)
    try:
        return create_app(settings, load_engines(settings, spawned))
    except (CheckpointError, ValueError, EngineStartError) as exc:
        raise UserError(str(exc)) from None
