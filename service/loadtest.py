"""Load benchmark of the HTTP service on loopback: `capeen bench-serve` (or `python -m service.loadtest`).

It starts `capeen serve` itself, twice, so that the only difference is the batching: one server with dynamic
batching (CAPEEN_MAX_BATCH_SIZE, default 16) and one with batch-1 serving (max_batch_size=1). The client
sends the same request stream (synthetic scenes from the training distribution, JPEG, cycled) to both and
measures, as the issue asks:

1. captions/s at concurrency 16 with batching vs batch-1 serving, in alternating rounds (`--rounds`): the
   speed of a shared or virtual machine drifts over minutes, and alternating makes the drift hit both alike;
2. p50/p95/p99 latency at concurrency 1, 4 and 16 (closed loop: each client sends its next request when
   the previous one is answered);
3. twice the saturating load (open loop: requests arrive at 2x the captions/s measured at concurrency 16,
   whatever the answers): counts of 200, 503 (back-pressure), 504 and other 5xx;
4. the server's resident memory (from /proc) over a soak at concurrency 16.

With `--compare CAPEEN_SETTING=VALUE` it measures one setting instead: two batching servers, as configured
and with that setting, in alternating rounds at each concurrency, then each at the overload rate (from the
faster of the two). `--compare CAPEEN_ENGINE_PROCESS=false`, for one, weighs the engine's child process.

With `--images-per-request K` it measures the two routes instead, on one batching server: the same images
sent one per POST /caption and K per POST /caption/batch, in alternating rounds at each concurrency.

The client shares the machine with the server, as a sidecar would. The Markdown tables go to stdout.
The scene renderer is imported where it is used: `capeen` imports this module to build its parser, and
`capeen --help` should not pay for it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from capeen.errors import UserError
from capeen.options import add_checkpoint

CONNECT_ERROR = 0  # status recorded for a request that got no HTTP answer at all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                        help="device of the servers (default cpu, the host the benchmark is specified for)")
    parser.add_argument("--mode", default="fixed", choices=["adaptive", "fixed", "full"],
                        help="decoding mode of every request (fixed: the calibrated threshold, the same work "
                             "for both servers)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="batch limit of the batching server")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts for latency")
    parser.add_argument("--requests", type=int, default=400, help="requests per closed-loop measurement")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating rounds of the batching against batch-1 comparison (its requests split "
                             "among them)")
    parser.add_argument("--overload-factor", type=float, default=2.0, help="offered load / saturating throughput")
    parser.add_argument("--overload-s", type=float, default=30.0, help="seconds of open-loop overload")
    parser.add_argument("--soak-s", type=float, default=300.0, help="seconds of the memory soak")
    parser.add_argument("--images", type=int, default=64, help="distinct images in the request stream")
    parser.add_argument("--image-size", type=int, default=192, help="side of the uploaded images, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-request", type=int, metavar="K",
                        help="instead: one batching server, the same images sent one per POST /caption and K "
                             "per POST /caption/batch, in alternating rounds at each concurrency")
    parser.add_argument("--compare", metavar="CAPEEN_SETTING=VALUE",
                        help="instead: two batching servers, as configured and with this setting (e.g. "
                             "CAPEEN_MAX_WAIT_MS=0), in alternating rounds at each concurrency, then each overloaded")


# --------------------------------------------------------------------------------------------- measurements


@dataclass
class Run:
    """The answers to one measurement: status and latency of each request, and its wall time."""

    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    captions: int = 0  # images captioned: one per 200 of POST /caption, the results with one in a batch's
    wall_s: float = 0.0
    batched_images: float = 0.0  # images, engine calls and engine-call seconds the server counted meanwhile
    engine_calls: float = 0.0
    engine_s: float = 0.0  # summed over the server's engines
    engines: int = 1

    def record(self, status: int, latency: float, captions: int) -> None:
        self.statuses.append(status)
        self.latencies.append(latency)
        self.captions += captions

    @property
    def mean_batch(self) -> float | None:
        return self.batched_images / self.engine_calls if self.engine_calls else None

    def engine_figures(self) -> tuple[str, str]:
        """The share of the wall time the engine was busy, and its milliseconds per image, as table cells."""
        if not self.batched_images or not self.wall_s:
            return "-", "-"
        return (f"{self.engine_s / (self.wall_s * self.engines):.0%}",
                f"{1000 * self.engine_s / self.batched_images:.2f}")

    @classmethod
    def merged(cls, runs: list[Run]) -> Run:
        """One run made of several (rounds of one measurement): their requests, wall times and batches."""
        return cls([s for r in runs for s in r.statuses], [lat for r in runs for lat in r.latencies],
                   sum(r.captions for r in runs), sum(r.wall_s for r in runs), sum(r.batched_images for r in runs),
                   sum(r.engine_calls for r in runs), sum(r.engine_s for r in runs),
                   max((r.engines for r in runs), default=1))

    @property
    def captions_per_s(self) -> float:
        return self.captions / self.wall_s if self.wall_s else 0.0

    def percentile_ms(self, q: float) -> float:
        ok = sorted(lat for lat, status in zip(self.latencies, self.statuses, strict=True) if status == 200)
        if not ok:
            return float("nan")
        return 1000.0 * ok[min(len(ok) - 1, round(q / 100 * (len(ok) - 1)))]


class Connections:
    """Keep-alive HTTP/1.1 connections to one server, for pre-encoded requests.

    Hand-rolled on asyncio streams because the client shares the CPU with the server: a general-purpose
    client spends more CPU per request than the server's HTTP layer, and would measure itself at 2x load.
    """

    # a connection idle for longer is not reused: uvicorn closes idle keep-alive connections after 5 s, and a
    # request written as the server closes one is reset, unanswered, a race of the client, not of the server
    # (HTTP clients expire idle connections the same way: httpx's keepalive_expiry)
    KEEPALIVE_EXPIRY_S = 4.0

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    def get(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode()

    def post_images(self, images: list[bytes], mode: str) -> bytes:
        """One image: POST /caption; more: POST /caption/batch."""
        boundary = "capeen-load-boundary"
        body = f'--{boundary}\r\nContent-Disposition: form-data; name="mode"\r\n\r\n{mode}\r\n'.encode()
        for data in images:
            body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="scene.jpg"\r\n'
                     "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        path = "/caption" if len(images) == 1 else "/caption/batch"
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status, body); status CONNECT_ERROR when the connection failed before a whole answer came."""
        while self._idle:  # a kept-alive connection the server has closed, or may be closing, answers nothing
            reader, writer, idle_since = self._idle.pop()
            if not reader.at_eof() and time.monotonic() - idle_since < self.KEEPALIVE_EXPIRY_S:
                break
            writer.close()
        else:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return CONNECT_ERROR, b""
        try:
            writer.write(request)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            writer.close()
            return CONNECT_ERROR, b""
        if headers.get("connection") == "close":
            writer.close()
        else:
            self._idle.append((reader, writer, time.monotonic()))
        return status, body

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (children of every thread)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    pending += [int(child) for child in children.read().split()]
        except FileNotFoundError:  # exited meanwhile
            continue
    return tree


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:  # exited meanwhile
        pass
    return 0


class Target:
    """One `capeen serve` process on a free loopback port."""

    def __init__(self, args: argparse.Namespace, max_batch_size: int, env: dict[str, str] | None = None) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.http = Connections(port)
        command = [str(Path(sys.executable).with_name("capeen")), "serve", "--host", "127.0.0.1",
                   "--port", str(port), "--device", args.device]
        if args.checkpoint:
            command += ["--checkpoint", args.checkpoint]
        env = {**os.environ, "CAPEEN_MAX_BATCH_SIZE": str(max_batch_size), "CAPEEN_LOG_LEVEL": "warning",
               **(env or {})}
        self.process = subprocess.Popen(command, env=env)

    def rss_mib(self) -> float:
        """Resident memory of the server and its children (the engine process), in MiB."""
        return sum(self.rss_split())

    def rss_split(self) -> tuple[float, float]:
        """Resident memory in MiB of the server's own process, and of its children together."""
        own, *children = _process_tree(self.process.pid)
        return _rss_kib(own) / 1024, sum(_rss_kib(pid) for pid in children) / 1024

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"capeen serve exited with status {self.process.returncode}")
            if (await self.http.send(self.http.get("/readyz")))[0] == 200:
                return
            await asyncio.sleep(0.2)
        raise UserError(f"capeen serve was not ready within {timeout_s:.0f} s")

    async def batch_totals(self) -> tuple[float, float, float, int]:
        """(images, engine calls, seconds in engine calls, engines) so far, from the server's metrics."""
        images = calls = engine_s = 0.0
        engines = 0
        for line in (await self.http.send(self.http.get("/metrics")))[1].decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == "capeen_batch_size_sum":
                images = float(value)
            elif name == "capeen_batch_size_count":
                calls = float(value)
            elif name.startswith("capeen_batch_duration_seconds_sum{"):  # one series per engine
                engine_s += float(value)
                engines += 1
        return images, calls, engine_s, max(engines, 1)

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Stream:
    """The request stream: the same images in the same order for every measurement, `images_per_request` in
    each request (the images cycled)."""

    def __init__(self, target: Target, images: list[bytes], mode: str, images_per_request: int = 1) -> None:
        self.target = target
        self.images_per_request = images_per_request
        cycled = [images[i % len(images)] for i in range(len(images) * images_per_request)]
        self.requests = [target.http.post_images(cycled[i:i + images_per_request], mode)
                         for i in range(0, len(cycled), images_per_request)]
        self.sent = 0

    async def send(self, run: Run) -> None:
        request = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        started = time.perf_counter()
        status, body = await self.target.http.send(request)
        latency = time.perf_counter() - started
        if status != 200:
            captions = 0
        elif self.images_per_request == 1:
            captions = 1
        else:
            captions = json.loads(body)["captioned"]
        run.record(status, latency, captions)


async def closed_loop(stream: Stream, concurrency: int, images: int) -> Run:
    """`concurrency` clients send requests one after the other until `images` images are sent."""
    run = Run()
    stream.sent = 0
    left = math.ceil(images / stream.images_per_request)

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await stream.send(run)

    before = await stream.target.batch_totals()
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - started
    after = await stream.target.batch_totals()
    run.batched_images, run.engine_calls, run.engine_s = (b - a for a, b in zip(before[:3], after[:3], strict=True))
    run.engines = after[3]
    return run


async def alternating(streams: list[Stream], concurrency: int, requests: int, rounds: int) -> list[list[Run]]:
    """Closed loops on each stream in turn, `rounds` times, the order reversed every other round; the
    requests are split among the rounds. Returns each stream's runs, round by round."""
    runs: list[list[Run]] = [[] for _ in streams]
    for index in range(rounds):
        share = requests // rounds + (index < requests % rounds)
        order = list(range(len(streams))) if index % 2 == 0 else list(reversed(range(len(streams))))
        for which in order:
            runs[which].append(await closed_loop(streams[which], concurrency, share))
    return runs


async def open_loop(stream: Stream, rate: float, duration_s: float, seed: int) -> tuple[Run, float]:
    """Poisson arrivals at `rate` per second for `duration_s`, each sent whatever the others' fate; also
    returns the arrival rate achieved (below `rate` if the client could not keep up)."""
    run = Run()
    arrivals = random.Random(seed)
    tasks = []
    started = time.perf_counter()
    next_at = started
    while next_at - started < duration_s:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.ensure_future(stream.send(run)))
        next_at += arrivals.expovariate(rate)
    achieved = len(tasks) / (time.perf_counter() - started)
    await asyncio.gather(*tasks)
    run.wall_s = time.perf_counter() - started
    return run, achieved


async def soak(stream: Stream, concurrency: int, duration_s: float) -> tuple[Run, list[tuple[float, float]]]:
    """Closed loop for `duration_s`, the RSS of the server and of its children sampled every second."""
    run = Run()
    samples = [stream.target.rss_split()]
    stop_at = time.monotonic() + duration_s

    async def client() -> None:
        while time.monotonic() < stop_at:
            await stream.send(run)

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(1.0)
            samples.append(stream.target.rss_split())

    started = time.perf_counter()
    await asyncio.gather(sampler(), *(client() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - started
    samples.append(stream.target.rss_split())
    return run, samples


# --------------------------------------------------------------------------------------------------- report


def _answer_counts(run: Run) -> tuple[Counter, int]:
    """Answers by status, and how many were a 5xx other than back-pressure (503) or a deadline (504)."""
    counts = Counter(run.statuses)
    return counts, sum(n for status, n in counts.items() if status >= 500 and status not in (503, 504))


def _latency_row(label: str, concurrency: int, run: Run) -> str:
    batch = f"{run.mean_batch:.1f}" if run.mean_batch is not None else "-"
    failed = len(run.statuses) - run.statuses.count(200)
    busy, engine_ms = run.engine_figures()
    return (f"| {label} | {concurrency} | {len(run.statuses)} | {failed} | {run.captions_per_s:.1f} | {batch} | "
            f"{busy} | {engine_ms} | {run.percentile_ms(50):.0f} | {run.percentile_ms(95):.0f} "
            f"| {run.percentile_ms(99):.0f} |")


def report(args: argparse.Namespace, batched: dict[int, Run], single: Run, round_ratios: list[float],
           overloaded: tuple[Run, float, float], soak_run: Run, rss_split: list[tuple[float, float]]) -> str:
    top = max(batched)
    overload, offered, achieved = overloaded
    counts, other_5xx = _answer_counts(overload)
    rss = [own + children for own, children in rss_split]
    half = rss[len(rss) // 2:]
    lines = [
        f"Load benchmark: checkpoint `{args.checkpoint or 'default'}`, device {args.device}, {os.cpu_count()} CPU "
        f"cores, mode={args.mode}, {args.images} distinct {args.image_size}x{args.image_size} JPEG scenes.",
        "",
        "| serving | concurrency | requests | not 200 | captions/s | mean batch | engine busy | engine ms/caption "
        "| p50 ms | p95 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(_latency_row(f"dynamic batching (max {args.max_batch_size})", c, run) for c, run in sorted(batched.items())),
        _latency_row("batch-1 (max_batch_size=1)", top, single),
        "",
        f"Dynamic batching vs batch-1 at concurrency {top}: "
        f"**{batched[top].captions_per_s / max(single.captions_per_s, 1e-9):.2f}x** captions/s "
        f"({len(round_ratios)} alternating rounds: {', '.join(f'{r:.2f}x' for r in round_ratios)}).",
        "",
        "| overload | target rate | achieved rate | seconds | requests | 200 | 503 | 504 | other 5xx | no answer "
        "| p50 ms of 200s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.overload_factor:g}x saturation | {offered:.1f}/s | {achieved:.1f}/s | {overload.wall_s:.0f} "
        f"| {len(overload.statuses)} "
        f"| {counts[200]} | {counts[503]} | {counts[504]} | {other_5xx} | {counts[CONNECT_ERROR]} "
        f"| {overload.percentile_ms(50):.0f} |",
        "",
        "| soak | seconds | requests | captions/s | RSS start MiB | RSS end MiB | RSS max MiB "
        "| second-half range MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| concurrency {top} | {soak_run.wall_s:.0f} | {len(soak_run.statuses)} | {soak_run.captions_per_s:.1f} "
        f"| {rss[0]:.1f} | {rss[-1]:.1f} | {max(rss):.1f} | {max(half) - min(half):.1f} |",
    ]
    if any(children for _, children in rss_split):  # the engine in a child process: each process's memory
        lines += ["", "| soak: RSS of | start MiB | end MiB | max MiB | first-half mean MiB | second-half mean MiB "
                      "| second-half range MiB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, series in (("the service's process", [own for own, _ in rss_split]),
                              ("the engine process", [children for _, children in rss_split])):
            first, second = series[: len(series) // 2], series[len(series) // 2:]
            lines.append(f"| {label} | {series[0]:.1f} | {series[-1]:.1f} | {max(series):.1f} "
                         f"| {sum(first) / len(first):.1f} | {sum(second) / len(second):.1f} "
                         f"| {max(second) - min(second):.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def _images(args: argparse.Namespace) -> list[bytes]:
    from models.synthetic import draw_example

    out = []
    for index in range(args.images):
        image = draw_example(args.seed, "test", index, args.image_size)[0]
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


async def _benchmark(args: argparse.Namespace, concurrency: list[int]) -> str:
    images = _images(args)
    top = max(concurrency)
    targets = [Target(args, args.max_batch_size), Target(args, 1)]  # both up: their rounds alternate
    try:
        for target in targets:
            await target.wait_ready()
        streams = [Stream(target, images, args.mode) for target in targets]
        for stream in streams:
            await closed_loop(stream, top, min(args.requests, 64))  # warm-up
        batching_rounds, single_rounds = await alternating(streams, top, args.requests, args.rounds)
        round_ratios = [b.captions_per_s / max(s.captions_per_s, 1e-9) for b, s in zip(batching_rounds, single_rounds)]
        targets.pop().stop()  # the batch-1 server's part is done: the rest measures the batching one alone
        stream = streams[0]
        batched = {c: await closed_loop(stream, c, args.requests) for c in concurrency if c != top}
        batched[top] = Run.merged(batching_rounds)
        offered = args.overload_factor * batched[top].captions_per_s
        overload, achieved = await open_loop(stream, offered, args.overload_s, args.seed)
        soak_run, rss = await soak(stream, top, args.soak_s)
    finally:
        for target in targets:
            target.stop()
    return report(args, batched, Run.merged(single_rounds), round_ratios, (overload, offered, achieved), soak_run, rss)


def parse_setting(text: str) -> tuple[str, str]:
    """`CAPEEN_MAX_WAIT_MS=0` -> ("CAPEEN_MAX_WAIT_MS", "0"), checked against the service's settings."""
    from pydantic import ValidationError

    from service.settings import Settings

    name, equals, value = text.partition("=")
    field = name.removeprefix("CAPEEN_").lower()
    if not equals or not name.startswith("CAPEEN_") or field not in Settings.model_fields:
        raise UserError(f"--compare takes CAPEEN_SETTING=VALUE with a setting of `capeen serve`, got {text!r}")
    try:
        Settings(**{field: value})
    except ValidationError as exc:
        raise UserError(f"--compare {text}: {exc.errors()[0]['msg']}") from None
    return name, value


async def _setting_comparison(args: argparse.Namespace, concurrency: list[int], name: str, value: str) -> str:
    """Batching servers as configured and with one setting (`name`=`value`) changed, side by side."""
    labels = ["as configured", f"{name}={value}"]
    images = _images(args)
    targets = [Target(args, args.max_batch_size), Target(args, args.max_batch_size, {name: value})]
    try:
        for target in targets:
            await target.wait_ready()
        streams = [Stream(target, images, args.mode) for target in targets]
        for stream in streams:
            await closed_loop(stream, max(concurrency), min(args.requests, 64))  # warm-up
        rounds = {c: await alternating(streams, c, args.requests, args.rounds) for c in concurrency}
        offered = args.overload_factor * max(Run.merged(rounds[max(concurrency)][i]).captions_per_s
                                             for i in range(len(streams)))
        overloads = [await open_loop(stream, offered, args.overload_s, args.seed) for stream in streams]
        rss = [target.rss_mib() for target in targets]
    finally:
        for target in targets:
            target.stop()
    lines = [
        f"Setting comparison: checkpoint `{args.checkpoint or 'default'}`, device {args.device}, "
        f"{os.cpu_count()} CPU cores, mode={args.mode}, dynamic batching (max {args.max_batch_size}), "
        f"{args.rounds} alternating rounds per concurrency.",
        "",
        *_side_by_side("server", labels, rounds, concurrency),
        "",
        "| server | offered | achieved rate | seconds | 200 | captions/s | 503 | 504 | other 5xx | no answer "
        "| RSS MiB after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, (run, achieved), memory in zip(labels, overloads, rss):
        counts, other_5xx = _answer_counts(run)
        lines.append(f"| {label} | {offered:.1f}/s | {achieved:.1f}/s | {run.wall_s:.0f} | {counts[200]} "
                     f"| {counts[200] / max(run.wall_s, 1e-9):.1f} | {counts[503]} | {counts[504]} | {other_5xx} "
                     f"| {counts[CONNECT_ERROR]} | {memory:.1f} |")
    return "\n".join(lines)


def _side_by_side(first_column: str, labels: list[str], rounds: dict[int, list[list[Run]]],
                  concurrency: list[int]) -> list[str]:
    """A table of two streams' alternating rounds at each concurrency (latencies are per request)."""
    lines = [
        f"| {first_column} | concurrency | requests | not 200 | captions/s | captions/s per round | mean batch "
        "| engine busy | engine ms/caption | p50 ms | p95 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in concurrency:
        for label, runs in zip(labels, rounds[c]):
            merged = Run.merged(runs)
            failed = len(merged.statuses) - merged.statuses.count(200)
            per_round = ", ".join(f"{r.captions_per_s:.1f}" for r in runs)
            batch = "-" if merged.mean_batch is None else f"{merged.mean_batch:.1f}"
            busy, engine_ms = merged.engine_figures()
            lines.append(f"| {label} | {c} | {len(merged.statuses)} | {failed} | {merged.captions_per_s:.1f} "
                         f"| {per_round} | {batch} | {busy} | {engine_ms} | {merged.percentile_ms(50):.1f} "
                         f"| {merged.percentile_ms(95):.1f} | {merged.percentile_ms(99):.1f} |")
    return lines


async def _route_comparison(args: argparse.Namespace, concurrency: list[int], per_request: int) -> str:
    """One batching server, the same images sent one per POST /caption and `per_request` per POST /caption/batch,
    side by side. Its queue holds what the clients send at once, so that neither stream is refused."""
    labels = ["`POST /caption`, 1 image", f"`POST /caption/batch`, {per_request} images"]
    queue_size = max(64, per_request * max(concurrency))
    env = {"CAPEEN_MAX_IMAGES_PER_REQUEST": str(per_request), "CAPEEN_QUEUE_SIZE": str(queue_size)}
    images = _images(args)
    target = Target(args, args.max_batch_size, env)
    try:
        await target.wait_ready()
        streams = [Stream(target, images, args.mode), Stream(target, images, args.mode, per_request)]
        for stream in streams:
            await closed_loop(stream, max(concurrency), min(args.requests, 64))  # warm-up
        rounds = {c: await alternating(streams, c, args.requests, args.rounds) for c in concurrency}
    finally:
        target.stop()
    lines = [
        f"Route comparison: checkpoint `{args.checkpoint or 'default'}`, device {args.device}, {os.cpu_count()} CPU "
        f"cores, mode={args.mode}, dynamic batching (max {args.max_batch_size}), CAPEEN_QUEUE_SIZE={queue_size}, "
        f"{args.requests} images per stream and concurrency in {args.rounds} alternating rounds (the batch stream "
        f"rounds each round up to whole requests of {per_request}).",
        "",
        *_side_by_side("route", labels, rounds, concurrency),
        "",
    ]
    for c in concurrency:
        single, batched = (Run.merged(runs) for runs in rounds[c])
        ratios = [b.captions_per_s / max(a.captions_per_s, 1e-9) for a, b in zip(*rounds[c], strict=True)]
        lines.append(f"- concurrency {c}: `POST /caption/batch` captioned "
                     f"**{batched.captions_per_s / max(single.captions_per_s, 1e-9):.2f}x** the images per second "
                     f"(rounds {', '.join(f'{r:.2f}x' for r in ratios)}).")
    return "\n".join(lines)


def bench_serve_main(args: argparse.Namespace) -> int:
    try:
        concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    except ValueError:
        raise UserError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    if not concurrency or concurrency[0] < 1 or args.requests < 1 or args.images < 1 or args.rounds < 1:
        raise UserError("--concurrency, --requests, --rounds and --images must be positive")
    from models.synthetic import MIN_IMAGE_SIZE

    if args.image_size < MIN_IMAGE_SIZE:  # the scenes' objects would not fit
        raise UserError(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    if args.rounds > args.requests:
        raise UserError(f"--rounds {args.rounds} is more than --requests {args.requests}: each round needs a request")
    if args.images_per_request is not None:
        if args.compare is not None:
            raise UserError("--images-per-request and --compare are two different measurements: give one")
        if args.images_per_request < 2:
            raise UserError(f"--images-per-request must be at least 2, got {args.images_per_request}")
        print(asyncio.run(_route_comparison(args, concurrency, args.images_per_request)))
    elif args.compare is None:
        print(asyncio.run(_benchmark(args, concurrency)))
    else:  # a bad setting is one line now, not after two servers have started
        print(asyncio.run(_setting_comparison(args, concurrency, *parse_setting(args.compare))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.loadtest", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return bench_serve_main(parser.parse_args(argv))
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
