"""Starting an engine child process, without torch: `capeen serve` starts its engines before it imports anything
heavy, so that the children load the model while the service imports torch and the web stack (service.cli).

The child is `python -m service.engine_process FD OPTIONS_JSON`; what it answers once the model is loaded and
warmed, and everything after, is service.engine_process's.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


@dataclass(frozen=True)
class EngineOptions:
    checkpoint: str | None
    device: str
    half: bool
    kv_fill: str | None
    torch_threads: int
    onednn: bool | str
    log_level: str = "info"
    index: int = 0  # which of the service's engines this is: it picks the GPU (placed_device)


def engine_options(settings: Settings, index: int = 0) -> EngineOptions:
    """The options of the service's engine number `index`."""
    return EngineOptions(
        checkpoint=None if settings.checkpoint is None else str(settings.checkpoint), device=settings.device,
        half=settings.half, kv_fill=settings.kv_fill, torch_threads=settings.torch_threads,
        onednn=settings.onednn, log_level=settings.log_level, index=index)


@dataclass
class SpawnedEngine:
    """A child started with `options`, loading its model; `service.engine_process.EngineProcess` waits for it."""

    options: EngineOptions
    process: subprocess.Popen
    conn: Connection

    def discard(self) -> None:
        """End a child that no EngineProcess took over (the service failed or was stopped while it loaded)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            self.conn.close()


def spawn_engine(options: EngineOptions) -> SpawnedEngine:
    ours, theirs = socket.socketpair()
    with theirs:
        # In a session of its own, the child never gets the terminal's Ctrl-C: until it has imported torch, that
        # would end it with a traceback. The service stops it through the pipe, and it exits when the pipe closes.
        process = subprocess.Popen([sys.executable, "-m", "service.engine_process", str(theirs.fileno()),
                                    json.dumps(asdict(options))], pass_fds=[theirs.fileno()],
                                   start_new_session=True)
    return SpawnedEngine(options, process, Connection(ours.detach()))
