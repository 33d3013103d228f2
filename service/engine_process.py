"""The caption engine in a process of its own, so that HTTP work never holds the interpreter lock it needs.

The decode loop is thousands of small torch calls per batch, and each one gives the Python lock up and takes
it back. In the service's process the event loop (multipart parsing, JSON, metrics) holds that lock in
between, so the decode loop can wait for it at every call. vLLM runs its engine core in a process of its own
for the same reason. Here the service keeps the queue, the batching, the bandit and the metrics; the child
only turns batches of pixels into decode traces. `capeen bench-serve` with and without it: BENCHMARKS.md.

The child is `python -m service.engine_process`, started with a socket pair (service.engine_spawn, which
`capeen serve` calls before it imports torch): no fork of a threaded process, no re-import of the service's
main module. The two talk over it in bytes (multiprocessing's message framing):
JSON headers and raw uint8 pixels, nothing pickled. A child that dies
fails the batch it was decoding (500 for its requests) and is started again for the next batch; so does a
child that does not answer a batch within its time limit (a hung GPU, a stopped process), after it is killed. The child
runs in a session of its own and ignores SIGINT and SIGTERM: Ctrl-C reaches the service only, which drains the
queue through the child before it stops it. If the service itself dies the pipe closes and the child exits.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from multiprocessing.connection import Connection

import numpy as np
import torch
from PIL import Image

from models import kernels
from models.checkpoint import CheckpointError
from models.decoding import DecodeTrace
from models.engine import BatchOutput, BatchTimings, CaptionEngine, CaptionResult, threshold_for
from models.model import CapeenConfig
from models.preprocess import image_to_uint8, normalize
from service.engine_spawn import EngineOptions, SpawnedEngine, spawn_engine
from service.log_setup import configure_logging

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading and warming a checkpoint, CUDA initialisation included
STOP_TIMEOUT_S = 10.0


class EngineStartError(Exception):
    """The child could not load or warm the checkpoint (the message says why, in one line)."""


class EngineProcessDied(Exception):
    """The child exited while decoding a batch."""


class EngineProcessHung(EngineProcessDied):
    """The child did not answer a batch in time; it was killed."""


def placed_device(device: str, index: int) -> str:
    """The device of engine number `index`: on CUDA (asked for, or `auto` on a host with a GPU), GPU `index`
    modulo the GPUs visible, so that N engines spread over N GPUs instead of sharing the first; otherwise
    `device` as it is."""
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


def start_engines(options: EngineOptions, count: int, batch_timeout_s: float = 60.0,
                  spawned: Sequence[SpawnedEngine] = ()) -> list[EngineProcess]:
    """`count` engine processes, numbered from 0 (which places them on GPUs) and started side by side, or the
    children `spawned` already started. Raises the first one's EngineStartError after stopping those that did
    start."""
    spawned = list(spawned) or [spawn_engine(replace(options, index=index)) for index in range(count)]
    with ThreadPoolExecutor(len(spawned), thread_name_prefix="capeen-engine-start") as pool:
        starting = [pool.submit(EngineProcess, child.options, batch_timeout_s, child) for child in spawned]
    started = [future.result() for future in starting if future.exception() is None]
    failures = [future.exception() for future in starting if future.exception() is not None]
    if failures:
        for engine in started:
            engine.close()
        raise failures[0]
    return started


# ---------------------------------------------------------------------------------------------------- child
def _child_main(conn: Connection, options_json: str) -> None:
    """The child: load and warm the engine, say so, then decode batches until told to stop or orphaned.

    The child imports the model and the engine only, never the web stack."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    options = EngineOptions(**json.loads(options_json))
    configure_logging(options.log_level)
    torch.set_num_threads(options.torch_threads)
    kernels.set_onednn(options.onednn)
    try:
        device = placed_device(options.device, options.index)
        if device.startswith("cuda:"):  # what asks the current GPU (bf16 support, for --half) asks this one
            torch.cuda.set_device(device)  # (a bare "cuda", without a GPU: the engine says so in words)
        engine = CaptionEngine.from_checkpoint(options.checkpoint, device=device, half=options.half,
                                               kv_fill=options.kv_fill)
        engine.warmup()
    except (CheckpointError, ValueError, OSError) as exc:
        conn.send_bytes(json.dumps({"error": str(exc)}).encode())
        return
    try:
        conn.send_bytes(json.dumps({"ready": _describe(engine)}).encode())
    except OSError:
        return  # the service went away while the model loaded (it failed to start, or was stopped)
    received = bytearray(1 << 20)  # pixels land here, batch after batch: no fresh half-megabyte per batch
    while True:
        try:
            header = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the service went away
        if header.get("op") == "stop":
            return
        size = int(np.prod(header["shape"]))
        if size > len(received):
            received = bytearray(size)
        conn.recv_bytes_into(received)
        pixels = np.frombuffer(received, dtype=np.uint8, count=size).reshape(header["shape"])
        try:
            # normalising makes a new tensor, so the buffer is free again for the next batch
            batch = normalize(torch.from_numpy(pixels).to(engine.device), engine.dtype)
            output = engine.caption_pixels(batch, header["thresholds"], max_tokens=header["max_tokens"])
            reply = {"results": [_result_to_json(r) for r in output.results],
                     "encode_s": output.timings.encode_s, "decode_s": output.timings.decode_s}
        except Exception as exc:  # one failing batch must not end the engine
            log.exception("engine failed on a batch of %d", len(header["thresholds"]))
            reply = {"failed": f"{type(exc).__name__}: {exc}"}
        try:
            conn.send_bytes(json.dumps(reply).encode())
        except OSError:
            return  # the service went away while this batch was decoded (it was stopped or ended by a signal)


def _describe(engine: CaptionEngine) -> dict:
    return {"name": engine.name, "config": engine.config.to_dict(),
            "calibrated_threshold": engine.calibrated_threshold, "exit_layers": list(engine.exit_layers),
            "exit_offsets": list(engine.exit_offsets), "kv_fill": engine.kv_fill, "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch.")}


_TRACE_FIELDS = ("token_ids", "exit_layers", "exit_confidences", "exit_points", "threshold", "catch_up_layers")


def _result_to_json(result: CaptionResult) -> dict:
    trace = {name: getattr(result.trace, name) for name in _TRACE_FIELDS}
    return {"caption": result.caption, "tokens": result.tokens, "threshold": result.threshold, "trace": trace}


def _result_from_json(data: dict) -> CaptionResult:
    return CaptionResult(caption=data["caption"], tokens=data["tokens"], threshold=data["threshold"],
                         trace=DecodeTrace(**data["trace"]))


# --------------------------------------------------------------------------------------------------- parent
class EngineProcess:
    """What the service needs of a `CaptionEngine`, served by a child process (see the module docstring).

    `caption_pixels` is called from one thread at a time (the batcher's engine thread); a lock keeps the pipe's
    request and reply together anyway.
    """

    def __init__(self, options: EngineOptions, batch_timeout_s: float = 60.0,
                 spawned: SpawnedEngine | None = None) -> None:
        self.options = options
        self.batch_timeout_s = batch_timeout_s  # past it without an answer, the child is taken for hung
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.restarts = 0
        self.on_restart: Callable[[], None] | None = None  # the service counts restarts in its metrics
        self._start(spawned)
        self._watchdog = _Watchdog(self.kill)

    def _start(self, spawned: SpawnedEngine | None = None) -> None:
        """Wait for a child (`spawned`, or one started now) to load and warm its model."""
        child = spawned or spawn_engine(self.options)
        process, conn = child.process, child.conn
        try:
            if not conn.poll(START_TIMEOUT_S):
                process.kill()
                process.wait()
                conn.close()
                raise EngineStartError(f"the engine did not start within {START_TIMEOUT_S:.0f} s")
            hello = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            conn.close()
            raise EngineStartError(f"the engine process exited while starting (exit code {process.wait()}); "
                                   "its log above says why") from None
        if "error" in hello:
            conn.close()
            process.wait(STOP_TIMEOUT_S)
            raise EngineStartError(hello["error"])
        described = hello["ready"]
        self.name: str = described["name"]
        self.config = CapeenConfig.from_dict(described["config"])
        self.calibrated_threshold: float | None = described["calibrated_threshold"]
        self.exit_layers = tuple(described["exit_layers"])
        self.exit_offsets = tuple(described["exit_offsets"])
        self.kv_fill: str = described["kv_fill"]
        self.device = torch.device(described["device"])
        self.dtype: torch.dtype = getattr(torch, described["dtype"])
        self.pid = process.pid
        self._process, self._conn = process, conn

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def threshold_for(self, mode: str, threshold: float | None = None) -> float:
        return threshold_for(mode, threshold, self.calibrated_threshold)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """uint8 pixels, (B, 3, H, W): a quarter of the bytes of floats through the pipe; the child normalises."""
        return torch.from_numpy(np.stack([image_to_uint8(image, self.config.image_size) for image in images]))

    def warmup(self) -> None:
        """Nothing to do: the child warms the model before it reports ready."""

    def caption_pixels(self, pixels: torch.Tensor, thresholds: list[float] | float,
                       max_tokens: int | None = None) -> BatchOutput:
        if pixels.dtype != torch.uint8:
            raise TypeError(f"the engine process takes uint8 pixels from its own pixels(), got {pixels.dtype}")
        count = pixels.shape[0]
        thresholds = [float(thresholds)] * count if isinstance(thresholds, (int, float)) else list(thresholds)
        header = json.dumps({"thresholds": thresholds, "max_tokens": max_tokens, "shape": list(pixels.shape)})
        with self._lock:
            if not self.alive:
                self._restart()
            try:
                self._watchdog.arm(self.batch_timeout_s)
                self._conn.send_bytes(header.encode())
                self._conn.send_bytes(memoryview(pixels.contiguous().numpy()).cast("B"))
                reply = json.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                if self._watchdog.fired:
                    self._process.wait()  # reaped (the watchdog may still be at it): the next batch sees it gone
                    raise EngineProcessHung(f"the engine process did not answer a batch of {count} within "
                                            f"{self.batch_timeout_s:g} s; it was killed and is started again "
                                            "for the next batch") from None
                code = self._wait(STOP_TIMEOUT_S)
                if code is None:  # a broken pipe to a child still running: end it, so the next batch starts anew
                    self._process.kill()
                    code = self._process.wait()
                raise EngineProcessDied(f"the engine process exited (exit code {code}) while "
                                        f"decoding a batch of {count}; it is started again for the next batch"
                                        ) from None
            finally:
                self._watchdog.disarm()
        if "failed" in reply:
            raise RuntimeError(reply["failed"])
        return BatchOutput([_result_from_json(r) for r in reply["results"]],
                           BatchTimings(encode_s=reply["encode_s"], decode_s=reply["decode_s"]))

    def _restart(self) -> None:
        log.error("the engine process (pid %s) is gone (exit code %s); starting it again", self.pid,
                  None if self._process is None else self._process.poll())
        if self._conn is not None:
            self._conn.close()
        started = time.perf_counter()
        self._start()
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart()
        log.info("engine process started again (pid %s) in %.1f s", self.pid, time.perf_counter() - started)

    def _wait(self, timeout: float) -> int | None:
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """End the child at once (from any thread): a batch it is decoding fails, the next one restarts it."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop the child after the batch in progress, if any; kill it if it does not stop in time."""
        with self._lock:
            if self._process is None:
                return
            with contextlib.suppress(OSError):  # a child gone already has nothing to be told
                self._conn.send_bytes(json.dumps({"op": "stop"}).encode())
            if self._wait(STOP_TIMEOUT_S) is None:
                log.warning("the engine process did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
                self._process.kill()
                self._process.wait()
            self._conn.close()
            self._process = None
            self._watchdog.stop()


class _Watchdog:
    """Calls `expire` once a batch has taken longer than its limit: a child that hangs in a decode, or that is
    stopped so that even sending it the pixels blocks. One thread that looks once a second, so that arming it
    for each batch costs nothing."""

    def __init__(self, expire: Callable[[], None]) -> None:
        self._expire = expire
        self._deadline: float | None = None
        self.fired = False  # whether it expired while armed for the batch in progress
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="capeen-engine-watchdog", daemon=True).start()

    def arm(self, seconds: float) -> None:
        self.fired = False
        self._deadline = time.monotonic() + seconds

    def disarm(self) -> None:
        self._deadline = None

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._deadline = None
                self.fired = True
                self._expire()


Engine = CaptionEngine | EngineProcess  # what the service captions with: in its process, or in a child


if __name__ == "__main__":  # the child: python -m service.engine_process FD OPTIONS_JSON
    _child_main(Connection(int(sys.argv[1])), sys.argv[2])
    gc.freeze()  # the service waits for this exit at shutdown; see capeen.cli.console_main
