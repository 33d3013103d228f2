"""`capeen caption --server URL`: caption images through a running capeen service instead of a local model.

The inputs and the output are those of local captioning (`models.commands.caption_main`): the same images,
folders and `--files-from` lists, the same text, JSON and JSON Lines, in the same order, with each unreadable
image named on stderr. The images go to `POST /caption/batch`, `--batch-size` of them per request (at most
the server's `max_images_per_request`), with `--concurrency` requests in flight; the files are read as they
are sent, so a manifest of millions never sits in memory.

What a bulk job needs from a client, and a loop of `curl` calls does not do:
- **Back-pressure is waited out.** A 503 (queue full, model loading, draining) or a gateway's 429 is sent
  again after the server's `Retry-After` (plus up to half of it again, at random, so that requests refused
  together do not all come back together), for up to `BACKPRESSURE_LIMIT_S`. Each such refusal also halves
  the number of requests this job keeps in flight, and each answer adds one back, up to `--concurrency`
  (TCP's additive increase, multiplicative decrease): a job asking more than the queue holds, or sharing
  the server, settles at what it gets instead of bouncing off the queue.
- **Failures that may pass are retried**: a 500 (an engine failed and is restarted), 502, 504, 408, a
  connection refused or cut (a server restarting), after a backoff that doubles from `FIRST_BACKOFF_S` to
  `MAX_BACKOFF_S`, up to `--retries` times a request. Mistakes that cannot pass (an unknown host name, TLS
  to a plain-HTTP port) are not retried.
- **An image the server refuses fails alone.** Its own result says why (413, 415, 422), and it is reported
  like an unreadable file. A file over the server's upload limit is not sent at all. When a whole request is
  too large for the server's body limit, its images are sent one by one, so that only the oversized one
  fails; when the server now takes fewer images per request (restarted with another setting), they are sent
  in smaller requests.
- A problem with the request itself (a bad option, a token the server refuses) stops the job at once with
  the server's own words. So does a request still failing after its retries. The captions printed before
  stay (`--json` still closes its array), in input order.

The JSON fields of a caption are the server's (`caption`, `tokens`, `exit_layers`, `mean_exit_layer`,
`threshold`, `arm`, `policy`), after `image`: the service does not return per-token confidences.
"""

from __future__ import annotations

import mimetypes
import random
import re
import socket
import ssl
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from capeen.errors import UserError

BACKPRESSURE = frozenset({429, 503})  # the server is busy: wait as it says, and send fewer at once
RETRIED_STATUSES = frozenset({408, 500, 502, 504})  # failures that may pass: a restarting engine or server
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
DEFAULT_CONCURRENCY, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S = 2, 8, 120.0  # --concurrency, --retries, --timeout
BACKPRESSURE_LIMIT_S = 600.0  # one request refused for longer than this: the server is not coming back
# the server's answer fields a caption keeps in --json and --jsonl (ImageCaption, less index and filename)
CAPTION_FIELDS = ("caption", "tokens", "exit_layers", "mean_exit_layer", "threshold", "arm", "policy")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110's token)
_CLIENT_HEADERS = {"content-length", "content-type", "host", "transfer-encoding", "connection"}


class RemoteError(Exception):
    """The server cannot caption for this job (unreachable, refusing the request, still failing after the
    retries): one line, which stops the job. `status`: the refusal's HTTP status, if there was an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def parse_header(text: str) -> tuple[str, str]:
    """`--header 'Name: value'` (a gateway's token, say) as (name, value)."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _TOKEN.fullmatch(name):
        raise UserError(f"--header {text!r}: expected 'Name: value', e.g. 'Authorization: Bearer TOKEN'")
    if name.lower() in _CLIENT_HEADERS:
        raise UserError(f"--header {name}: set by the client itself for each request")
    if not value.isascii() or not value.isprintable():
        raise UserError(f"--header {name}: the value must be printable ASCII (a pasted non-breaking space?)")
    return name, value


def _problem(response: httpx.Response) -> str:
    """A refused request in one line: its status and the service's `detail` (or the start of a text body)."""
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        detail = None
    if not isinstance(detail, str):  # a proxy's or another server's answer: its page says no more than this
        text = "" if "html" in response.headers.get("content-type", "") else " ".join(response.text.split())[:200]
        detail = text or response.reason_phrase
    return f"{response.status_code} {detail}"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(response.headers["retry-after"])))
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date (the service sends seconds): the backoff decides


def _hopeless(exc: httpx.TransportError) -> bool:
    """A transport failure that no retry mends: a host name that does not resolve, TLS spoken to a port
    that does not, a request the HTTP library itself refuses to send."""
    if isinstance(exc, (httpx.LocalProtocolError, httpx.UnsupportedProtocol)):
        return True
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (socket.gaierror, ssl.SSLError)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class _Window:
    """How many requests may be in flight: halved at each refusal for back-pressure, one more after each
    answer, between 1 and `limit` (see the module docstring)."""

    def __init__(self, limit: int, stopped: threading.Event) -> None:
        self.limit = self.size = limit
        self._busy = 0
        self._stopped = stopped
        self._changed = threading.Condition()

    def acquire(self) -> None:
        with self._changed:
            while self._busy >= self.size:
                if self._stopped.is_set():
                    raise RemoteError("the job stopped")
                self._changed.wait(0.1)
            self._busy += 1

    def release(self, answered: bool, refused: bool) -> None:
        with self._changed:
            self._busy -= 1
            if refused:
                self.size = max(1, self.size // 2)
            elif answered:
                self.size = min(self.limit, self.size + 1)
            self._changed.notify_all()


class Server:
    """One capeen service: its limits (from `GET /v1/model`) and a pool of kept-alive connections to it."""

    def __init__(self, url: str, *, headers: Iterable[tuple[str, str]] = (), timeout_s: float = 120.0,
                 retries: int = 8, concurrency: int = 1, transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise RemoteError(f"--server {url}: give the service's URL, e.g. http://localhost:8000")
        self.url = url.rstrip("/")
        self.retries = retries
        self._stopped = threading.Event()  # set by stop(): no request is sent again after it
        self.window = _Window(concurrency, self._stopped)
        self._sleep: Callable[[float], bool] = self._stopped.wait  # True: stopped meanwhile
        try:
            self.http = httpx.Client(base_url=self.url, headers=list(headers), timeout=timeout_s,
                                     transport=transport)
        except httpx.InvalidURL as exc:
            raise RemoteError(f"--server {url}: {exc}") from None
        try:
            self._read_limits()
        except RemoteError as exc:
            self.http.close()
            if exc.status == 404:  # another kind of server, or a URL with a path the service does not have
                raise RemoteError(f"{self.url}: not a capeen service (GET /v1/model answered 404)", 404) from None
            raise

    def _read_limits(self) -> None:
        try:
            info = self._send("GET", "/v1/model").json()
            self.model: str = str(info["name"])
            self.max_images: int = int(info["max_images_per_request"])
            upload = info.get("max_upload_bytes")
            self.max_upload_bytes: int | None = None if upload is None else int(upload)
            # said as null by the service; a server that does not say is taken as calibrated
            self.uncalibrated = "calibrated_threshold" in info and info["calibrated_threshold"] is None
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteError(f"{self.url}: not a capeen service (GET /v1/model answered without its fields: "
                              f"{type(exc).__name__})") from None
        if self.max_images < 1 or (self.max_upload_bytes is not None and self.max_upload_bytes < 1):
            raise RemoteError(f"{self.url}: GET /v1/model gives limits below 1: {info}")

    def stop(self) -> None:
        """Send nothing again: a request waiting to be retried gives up (a request on the wire still ends)."""
        self._stopped.set()

    def close(self) -> None:
        self.stop()
        self.http.close()

    def _send(self, method: str, path: str, **request) -> httpx.Response:
        """The answer to one request, sent again while the server is busy or away (module docstring); a
        refused request raises RemoteError, an answered one (200, or a batch's own 413 or 422) is returned."""
        backoff, failures, refused_for = FIRST_BACKOFF_S, 0, 0.0
        while True:
            self.window.acquire()
            response = None
            try:
                response = self.http.request(method, path, **request)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be restarting
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if _hopeless(exc):
                    raise RemoteError(f"{self.url}{path}: {problem}") from None
            finally:
                status = None if response is None else response.status_code
                self.window.release(answered=status not in RETRIED_STATUSES | BACKPRESSURE | {None},
                                    refused=status in BACKPRESSURE)
            if status in BACKPRESSURE:
                # back-pressure is not a failure: it is waited out for as long as the server keeps answering
                wait = _retry_after(response)
                wait = (backoff if wait is None else wait) * random.uniform(1.0, 1.5)
                refused_for += wait
                if refused_for > BACKPRESSURE_LIMIT_S:
                    raise RemoteError(f"{self.url}{path}: {_problem(response)} (still refused after "
                                      f"{BACKPRESSURE_LIMIT_S:.0f} s)", status)
            elif status is None or status in RETRIED_STATUSES:
                if response is not None:
                    problem = _problem(response)
                if failures == self.retries:
                    tries = "retry" if self.retries == 1 else "retries"
                    raise RemoteError(f"{self.url}{path}: {problem} (given up after {self.retries} {tries})", status)
                failures += 1
                wait = _retry_after(response) if response is not None else None
                wait = backoff if wait is None else wait
            elif status == 200 or (path == "/caption/batch" and status in (413, 422)):
                return response
            else:
                raise RemoteError(f"{self.url}{path}: {_problem(response)}", status)
            if self._sleep(wait):
                raise RemoteError(f"{self.url}{path}: the job stopped")
            backoff = min(MAX_BACKOFF_S, 2 * backoff)

    def caption(self, images: list[tuple[str, bytes]], options: dict[str, str]) -> list[dict]:
        """One result per image, in order: the server's ImageCaption or ImageFailure fields."""
        files = [("image", (_sendable(name), data, mimetypes.guess_type(name)[0] or "application/octet-stream"))
                 for name, data in images]
        response = self._send("POST", "/caption/batch", files=files, data=options)
        if response.status_code == 200:
            try:
                results = response.json()["results"]
            except (ValueError, KeyError, TypeError):
                results = None
            if not isinstance(results, list) or len(results) != len(images) \
                    or not all(isinstance(result, dict) for result in results):
                raise RemoteError(f"{self.url}/caption/batch: answered 200 without a result for each of the "
                                  f"{len(images)} images sent (a proxy in the way?): {_problem(response)}")
            return results
        if response.status_code == 422:  # too many images now? (a server restarted with a lower limit)
            self._read_limits()
            if len(images) <= self.max_images:
                raise RemoteError(f"{self.url}/caption/batch: {_problem(response)}", 422)
            return [result for start in range(0, len(images), self.max_images)
                    for result in self.caption(images[start:start + self.max_images], options)]
        if len(images) == 1:  # over the body limit on its own: its own failure, as the server words it
            return [{"status": 413, "error": "upload_too_large", "detail": _problem(response).removeprefix("413 ")}]
        return [result for image in images for result in self.caption([image], options)]


def _sendable(name: str) -> str:
    """A file name that HTTP can carry: one the file system gave as bytes that are not UTF-8 keeps the rest
    (the service only echoes it; the output names the file by its path)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _in_background(function: Callable, *args) -> Future:
    """`function(*args)` on a daemon thread: a request on the wire never keeps a stopped job (Ctrl-C, a closed
    pipe, an error) from exiting, as a pool's threads would until the request's timeout."""
    future: Future = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # handed to the main thread, which reads every future in order
                future.set_exception(exc)

    threading.Thread(target=run, name="capeen-remote", daemon=True).start()
    return future


@dataclass
class _Chunk:
    """Consecutive inputs: the images of one request and the failures between them, in input order."""

    entries: list[tuple[Path, int | str]] = field(default_factory=list)  # (path, index of its image or problem)
    images: list[tuple[str, bytes]] = field(default_factory=list)
    results: Future | None = None


def caption_remote(args, found: Iterator, output) -> int:
    """`capeen caption --server`: what `caption_main` does with a local model, through the service; exit status
    1 when some image could not be captioned."""
    from models.images import MAX_FILE_BYTES, ImageError, read_image_file

    args.concurrency = DEFAULT_CONCURRENCY if args.concurrency is None else args.concurrency
    args.retries = DEFAULT_RETRIES if args.retries is None else args.retries
    args.timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    if args.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.retries < 0:
        raise UserError(f"--retries must be 0 or more, got {args.retries}")
    if not 0 < args.timeout <= 86_400:  # nan fails both; a day is more than any request needs
        raise UserError(f"--timeout must be a positive number of seconds, at most 86400, got {args.timeout}")
    headers = [parse_header(text) for text in args.header or ()]
    options = {"mode": args.mode}
    if args.threshold is not None:
        options["threshold"] = repr(args.threshold)
    if args.max_tokens is not None:
        options["max_tokens"] = str(args.max_tokens)
    try:
        server = Server(args.server, headers=headers, timeout_s=args.timeout, retries=args.retries,
                        concurrency=args.concurrency)
    except RemoteError as exc:
        raise UserError(str(exc)) from None
    if args.mode == "fixed" and args.threshold is None and server.uncalibrated:  # not one 422 per request
        server.close()
        raise UserError(f"{server.url}: the server's model {server.model} has no calibrated threshold: give "
                        f"--threshold T, or --mode adaptive or full")
    failures = 0

    def failed(path: Path, problem: str) -> None:
        nonlocal failures
        failures += 1
        print(f"capeen caption: {problem}", file=sys.stderr, flush=True)
        output.failure_record(path, problem)

    def emit(chunk: _Chunk) -> None:
        results = chunk.results.result() if chunk.results is not None else []
        for path, entry in chunk.entries:
            if isinstance(entry, str):
                failed(path, entry)
                continue
            result = results[entry]
            if "caption" in result:
                output.remote_caption(path, {name: result.get(name) for name in CAPTION_FIELDS})
            else:
                # the service words it for its form field ("image: empty (0 bytes)"); locally it is the file's
                detail = str(result.get("detail") or result.get("error") or "refused by the server")
                failed(path, f"{path}: {detail.removeprefix('image: ')}")

    in_flight: deque[_Chunk] = deque()
    chunk = _Chunk()
    try:
        for item in found:  # an image file's path, or why a folder or list could not be read
            problem = str(item) if isinstance(item, ImageError) else None
            if problem is None:
                # a server that does not say its limit still gets no file larger than a local run would read
                limit = server.max_upload_bytes or MAX_FILE_BYTES
                try:
                    data = read_image_file(item, limit)
                except ImageError as exc:
                    problem = str(exc) if exc.kind != "too_large" or server.max_upload_bytes is None else \
                        f"{item}: larger than the server's upload limit of {limit} bytes (CAPEEN_MAX_UPLOAD_BYTES)"
            if problem is not None:  # named in its place, after the images before it
                chunk.entries.append((getattr(item, "path", None) or item, problem))
            else:
                chunk.images.append((item.name, data))
                chunk.entries.append((item, len(chunk.images) - 1))
            if len(chunk.images) >= min(args.batch_size, server.max_images):  # the server's may change
                chunk.results = _in_background(server.caption, chunk.images, options)
                in_flight.append(chunk)
                chunk = _Chunk()
            while in_flight and (len(in_flight) >= args.concurrency or in_flight[0].results.done()):
                emit(in_flight.popleft())
            if not in_flight and not chunk.images and chunk.entries:  # failures that nothing waits before
                emit(chunk)  # (a folder of broken files must not pile up)
                chunk = _Chunk()
        if chunk.images:
            chunk.results = _in_background(server.caption, chunk.images, options)
        in_flight.append(chunk)
        while in_flight:
            emit(in_flight.popleft())
    except RemoteError as exc:
        output.close()  # what was captioned stays readable: --json closes its array
        raise UserError(str(exc)) from None
    finally:  # a stopped job (an error, Ctrl-C, a closed pipe) sends nothing more
        server.stop()
    # closed only when nothing is in flight: closing waits for the requests on the wire, which a stopped job
    # leaves to their daemon threads
    server.close()
    output.close()
    return 1 if failures else 0
