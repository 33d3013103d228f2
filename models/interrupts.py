"""Holding Ctrl-C and termination back while a few renames put a finished piece of work in place, and turning
termination into an interruption where there is work to keep."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

DEFERRED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (they are delivered right after it), so that a
    sequence of renames, or a training step, is never cut in the middle.

    The signals' handlers are swapped for ones that only note them. Blocking them in this thread would not do:
    the kernel hands a process's signal to any thread that does not block it (tqdm's monitor, a reader pool's
    worker), and Python then raises KeyboardInterrupt in the main thread all the same. Handlers can only be set
    from the main thread, and only there does a signal raise anything, so elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for number in DEFERRED:
        handler = signal.getsignal(number)
        if handler is None or handler == signal.SIG_IGN:  # set outside Python, or ignored: leave it alone
            continue
        previous[number] = handler
        signal.signal(number, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(caught):  # each signal once, in the order it came
            signal.raise_signal(number)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C is, so that what keeps work on Ctrl-C keeps it on these too."""

    def __init__(self, number: int) -> None:
        super().__init__(signal.Signals(number).name)
        self.signal = number


TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def termination_interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM (`timeout`, `docker stop`, a batch scheduler's end of time) and SIGHUP (a closed
    terminal) raise `Terminated` instead of ending the process on the spot. Signals that arrive ignored (`nohup`)
    stay ignored; outside the main thread nothing changes, as for `signals_deferred`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(received: int, frame) -> None:
        raise Terminated(received)

    previous = {}
    for number in TERMINATING:
        if signal.getsignal(number) == signal.SIG_DFL:
            previous[number] = signal.signal(number, terminate)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
