"""Dynamic batching: concurrent requests share one engine call, each with its own threshold.

Requests wait in a bounded queue. A single worker task takes the first one and gathers what is queued, up to
`max_batch_size`. It waits for requests on their way (being uploaded or decoded: see `incoming`) only up to
`max_wait_s` and only while the batch holds less than `wait_fill` of `max_batch_size`: a lone request never
waits for company that is not coming, and under load a half-full batch goes at once, so that the engine
decodes it while the next one gathers (with 16 clients and batches of 16, the engine would otherwise sit
idle while a whole batch's answers go out and its clients' next requests come in). It runs the engine
in one dedicated thread so the event loop keeps accepting and answering requests meanwhile (as TGI's and
vLLM's routers keep HTTP apart from the model loop); with the engine in a child process (service.engine_process)
that thread only waits on the pipe. Each request's future gets its own result.

With several engines (processes, each with its own copy of the model), each has a worker and a thread of its
own, and the workers take their batches from the one queue: a batch goes to whichever engine is free first.

Back-pressure and abandonment:
* a full queue refuses at once (`QueueFull`: 503 upstream) instead of letting latency grow without bound;
* a request whose deadline passes, or whose client goes away, stops waiting and cancels its future. It
  leaves the count of waiting requests at once (the queue-depth gauge, and room for a new request), and
  the worker throws it away when it comes to it, without decoding it, and drops results nobody waits
  for, so neither ever stalls it;
* `close()` refuses new requests, lets the worker finish everything queued, then stops it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby

import torch

from bandit import Arm
from models.engine import BatchOutput, CaptionResult
from service.engine_process import Engine
from service.metrics import ServingMetrics

log = logging.getLogger(__name__)


class EngineThread(Executor):
    """Runs one engine's batches, in order, on a daemon thread of its own.

    ThreadPoolExecutor's threads are joined when Python exits, so an in-process engine stuck in a batch (a
    hung GPU) kept the service from ever exiting, even after the bounded drain at shutdown had given up on
    it. A daemon thread is simply dropped at exit. (An engine process is killed instead: service.runtime.)"""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to the awaiting worker, as an executor does
                    future.set_exception(exc)


class QueueFull(Exception):
    """The queue holds `queue_size` requests already."""


class ShuttingDown(Exception):
    """The batcher is draining and takes no new requests."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its caption was ready."""


class Abandoned(Exception):
    """The caller stopped waiting (its client disconnected)."""


class EngineFailed(Exception):
    """The engine raised while decoding the batch this request was in."""


@dataclass
class Job:
    pixels: torch.Tensor  # (1, 3, H, W), as the engine's pixels() made them
    threshold: float
    max_tokens: int
    arm: Arm | None  # the bandit arm that chose `threshold`; None unless adaptive
    future: asyncio.Future[Outcome]
    enqueued: float = field(default_factory=time.perf_counter)
    waiting: bool = True  # counted among the requests waiting for the engine


@dataclass(frozen=True)
class Outcome:
    result: CaptionResult
    queue_s: float
    encode_s: float  # of the whole batch the request was decoded in
    decode_s: float


_STOP = object()  # queued by close(): the worker ends after what is ahead of it
_NO_PIXELS = torch.empty(0, dtype=torch.uint8)


class Batcher:
    def __init__(self, engines: Sequence[Engine], metrics: ServingMetrics,
                 on_decoded: Callable[[Job, CaptionResult], None], *, max_batch_size: int, max_wait_s: float,
                 queue_size: int, wait_fill: float = 0.5) -> None:
        """`on_decoded` runs in an engine thread for every decoded request, wanted or not (metrics, bandit), and
        must be safe to call from several at once when there are several engines."""
        self.engines = list(engines)
        self.metrics = metrics
        self.on_decoded = on_decoded
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.wait_until = max(1, math.ceil(wait_fill * max_batch_size))  # batch size from which nobody is awaited
        self.queue_size = queue_size
        # Unbounded: the limit is on images still waiting (`_waiting`), so that abandoned ones, which stay
        # in the queue until a worker comes to them, hold no room that a live request could have.
        self._queue: asyncio.Queue[Job | object] = asyncio.Queue()
        self._waiting = 0
        self._executors = [EngineThread(f"capeen-engine-{index}") for index in range(len(self.engines))]
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._incoming = 0

    @property
    def running(self) -> bool:
        return bool(self._workers) and not any(worker.done() for worker in self._workers) and not self._closing

    @property
    def closing(self) -> bool:
        """Shutdown has begun: new requests are refused while the queued ones are decoded."""
        return self._closing

    def depth(self) -> int:
        """Images queued whose caller still waits (what the queue size limits)."""
        return self._waiting

    def _on_done(self, job: Job, _future: asyncio.Future) -> None:
        if job.waiting:  # abandoned in the queue: only its place in the queue is left to give up, not its pixels
            job.pixels = _NO_PIXELS
        self._stop_waiting(job)

    def _stop_waiting(self, job: Job) -> None:
        """`job` left the count of waiting requests: taken by a worker, or abandoned by its caller."""
        if job.waiting:
            job.waiting = False
            self._waiting -= 1

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Marks a request whose upload is being read and decoded: it will be queued in a moment, so a batch
        being formed waits for it (up to `max_wait_s`) instead of leaving without it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(index), name=f"capeen-batcher-{index}")
                         for index in range(len(self.engines))]

    async def close(self) -> None:
        """Refuse new requests, decode those queued, stop the workers and their threads."""
        self._closing = True
        alive = [worker for worker in self._workers if not worker.done()]
        for _ in alive:  # one marker each, behind every queued request: each worker stops at the first it takes
            await self._queue.put(_STOP)
        await asyncio.gather(*alive)
        for executor in self._executors:
            executor.shutdown(wait=True)

    async def caption_all(self, images: Sequence[tuple[torch.Tensor, float, Arm | None]], max_tokens: int, *,
                          timeout: float, abandoned: Callable[[], Awaitable[object]]) -> list[Outcome]:
        """Queue a request's images (pixels, threshold, arm) all at once, or none when the queue lacks room for all
        of them, and wait for every caption, for at most `timeout` seconds and only until the awaitable that
        `abandoned()` returns completes (the client went away). A failure or the deadline ends the wait for all
        of them: the caller answers the request as a whole."""
        if self._closing:
            raise ShuttingDown("the service is shutting down")
        if timeout <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        if self._waiting + len(images) > self.queue_size:
            wanted = "" if len(images) == 1 else f", and this request has {len(images)}"
            raise QueueFull(f"{self._waiting} of the queue's {self.queue_size} images are already waiting{wanted}")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = []
        for pixels, threshold, arm in images:
            job = Job(pixels, threshold, max_tokens, arm, loop.create_future())
            self._queue.put_nowait(job)
            self._waiting += 1
            job.future.add_done_callback(partial(self._on_done, job))
            futures.append(job.future)
        every = asyncio.gather(*futures)  # done when all are, or at the first that fails
        # once the wait ends without it (deadline, client gone), its cancellation is nobody's news: read it, or
        # asyncio logs an error for every such request
        every.add_done_callback(lambda gathered: gathered.cancelled() or gathered.exception())
        watcher = asyncio.ensure_future(abandoned())
        try:
            done, _ = await asyncio.wait({every, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            for future in futures:
                future.cancel()  # unless answered already: the worker skips it, or drops its result
        if every in done:
            return every.result()
        every.cancel()
        if watcher in done:
            raise Abandoned("the client went away")
        raise DeadlineExceeded(f"no caption within the deadline ({timeout:.3g} s left when queued)")

    async def _work(self, engine: int) -> None:
        """The worker of engine number `engine`."""
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            batch, stop = await self._collect(loop)
            wanted = [job for job in batch if not job.future.done()]
            # one engine call per max_tokens value: a batch decodes to a single length limit
            for _, group in groupby(sorted(wanted, key=lambda job: job.max_tokens), key=lambda job: job.max_tokens):
                await self._decode(loop, engine, list(group))

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> tuple[list[Job], bool]:
        """The next batch, and whether the stop marker came after it."""
        batch: list[Job] = []
        while not batch:  # the first request still wanted
            first = await self._queue.get()
            if first is _STOP:
                return [], True
            if not first.future.done():
                batch.append(first)
            self._stop_waiting(first)
        closes_at = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = closes_at - loop.time()
                # nobody on the way: waiting would only add latency; full enough: better decoded now
                if remaining <= 0 or not self._incoming or len(batch) >= self.wait_until:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                    break
            if item is _STOP:
                return batch, True
            if not item.future.done():  # an abandoned request takes no place in the batch
                batch.append(item)
            self._stop_waiting(item)
        return batch, False

    async def _decode(self, loop: asyncio.AbstractEventLoop, engine: int, jobs: list[Job]) -> None:
        started = time.perf_counter()
        self.metrics.batch_size.observe(len(jobs))
        for job in jobs:
            self.metrics.queue_duration.observe(started - job.enqueued)
        try:
            output = await loop.run_in_executor(self._executors[engine], self._run, engine, jobs)
        except Exception as exc:  # a failing batch answers its requests with 500 and the worker goes on
            log.exception("engine failed on a batch of %d", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(EngineFailed(f"{type(exc).__name__}: {exc}"))
            return
        for job, result in zip(jobs, output.results, strict=True):
            if not job.future.done():
                job.future.set_result(Outcome(result, queue_s=started - job.enqueued,
                                              encode_s=output.timings.encode_s, decode_s=output.timings.decode_s))

    def _run(self, engine: int, jobs: list[Job]) -> BatchOutput:
        """In the thread of engine number `engine`: one call of it, then `on_decoded` for each request."""
        started = time.perf_counter()
        output = None
        try:
            output = self.engines[engine].caption_pixels(torch.cat([job.pixels for job in jobs]),
                                                         [job.threshold for job in jobs],
                                                         max_tokens=jobs[0].max_tokens)
        finally:  # a failed call kept the engine busy too
            self.metrics.observe_batch(engine, time.perf_counter() - started,
                                       None if output is None else output.timings)
        for job, result in zip(jobs, output.results, strict=True):
            try:
                self.on_decoded(job, result)
            except Exception:  # the captions are good: what failed is counting or learning from one of them
                log.exception("recording a decoded request failed; its caption is answered all the same")
        return output
