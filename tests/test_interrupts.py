"""`models.interrupts.signals_deferred`: a Ctrl-C or SIGTERM never cuts a commit or a training step in two."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from models.interrupts import signals_deferred


def test_ctrl_c_waits_for_the_end_of_the_block_even_with_other_threads_running(ctrl_c_raises) -> None:
    # other threads (tqdm's monitor, a reader pool) take a process's signal when this one blocks it: the block
    # must still run to its end before KeyboardInterrupt comes
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler would have run by now
                finished.append("block")
            finished.append("after")  # never reached: the interrupt comes as the block ends
    finally:
        stop.set()
    assert finished == ["block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_other_signals_reach_their_own_handlers_once_after_the_block() -> None:
    received = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert received == []
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_ignored_signal_stays_ignored_and_a_quiet_block_changes_nothing(ctrl_c_raises) -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    with signals_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
