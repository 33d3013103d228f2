"""Where the service's log lines go, and at which level.

`CAPEEN_LOG_LEVEL` is the level of our own loggers (the `service`, `models`, `bandit` and `capeen` packages;
uvicorn sets its own from the same setting). Every other library stays at WARNING: at `info` or `debug`, torch,
PIL and the HTTP stack would otherwise fill the log with their internals (torch's "FakeTensor cache stats" on a
Ctrl-C, PIL's every chunk of a PNG)."""
from __future__ import annotations

import logging

OUR_PACKAGES = ("service", "models", "bandit", "capeen")
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Lines on stderr: ours from `level` up, everyone else's from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format=LINE_FORMAT)
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(level.upper())
