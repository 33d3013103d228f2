"""`capeen caption --server URL`: caption images through a running capeen service instead of a local model.

The inputs and the output are those of local captioning (`models.commands.caption_main`): the same images,
folders and `--files-from` lists, the same text, JSON and JSON Lines, in the same order, with each unreadable
image named on stderr. The images go to `POST /caption/batch`, `--batch-size` of them per request (at most
the server's `max_images_per_request`), with `--concurrency` requests in flight; the files are read as they
are sent, so a manifest of millions never sits in memory.

What a bulk job needs from a client, and a loop of `curl` calls does not do:
- **Back-pressure is honoured.** A 503 (queue full, or the model still loading) is retried after the server's
  `Retry-After`; a 504 (deadline), a 500 (an engine that failed and is restarted), a gateway's 502 and a
  connection that fails (a server restarting) after a backoff that doubles up to `MAX_BACKOFF_S`. After
  `--retries` retries of one request the job stops with one line saying why; the captions printed so far stay.
- **An image the server refuses fails alone.** Its own result says why (413, 415, 422), and it is reported
  like an unreadable file. A file over the server's upload limit is not sent at all. When a whole request is
  too large for the server's body limit, its images are sent one by one, so that only the oversized one fails.
- A problem with the request itself (a bad option, a token the server refuses) stops the job at once with
  the server's own words.

The JSON fields of a caption are the server's (`caption`, `tokens`, `exit_layers`, `mean_exit_layer`,
`threshold`, `arm`, `policy`), after `image`: the service does not return per-token confidences.
"""

from __future__ import annotations

import mimetypes
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from capeen.errors import UserError

# statuses worth sending the same request again for: back-pressure, deadlines, a restarting engine or server
RETRIED_STATUSES = frozenset({500, 502, 503, 504})
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
# the server's answer fields a caption keeps in --json and --jsonl (ImageCaption, less index and filename)
CAPTION_FIELDS = ("caption", "tokens", "exit_layers", "mean_exit_layer", "threshold", "arm", "policy")


class RemoteError(Exception):
    """The server cannot caption for this job (unreachable, refusing the request, still failing after the
    retries): one line, which stops the job. `status`: the refusal's HTTP status, if there was an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def parse_header(text: str) -> tuple[str, str]:
    """`--header 'Name: value'` (a gateway's token, say) as (name, value)."""
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or any(c.isspace() for c in name.strip()):
        raise UserError(f"--header {text!r}: expected 'Name: value', e.g. 'Authorization: Bearer TOKEN'")
    return name.strip(), value.strip()


def _problem(response: httpx.Response) -> str:
    """A refused request in one line: its status and the service's `detail` (or the start of the body)."""
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        detail = None
    if not isinstance(detail, str):
        detail = " ".join(response.text.split())[:200] or response.reason_phrase
    return f"{response.status_code} {detail}"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(response.headers["retry-after"])))
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date (the service sends seconds): the backoff decides


class Server:
    """One capeen service: its limits (from `GET /v1/model`) and a pool of kept-alive connections to it."""

    def __init__(self, url: str, *, headers: Iterable[tuple[str, str]] = (), timeout_s: float = 120.0,
                 retries: int = 8, transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise RemoteError(f"--server {url}: give the service's URL, e.g. http://localhost:8000")
        self.url = url.rstrip("/")
        self.retries = retries
        self._stopped = threading.Event()  # set by close(): no request is sent again after it
        self.http = httpx.Client(base_url=self.url, headers=list(headers), timeout=timeout_s, transport=transport)
        try:
            info = self._send("GET", "/v1/model").json()
            self.model: str = info["name"]
            self.max_images: int = int(info["max_images_per_request"])
            self.max_upload_bytes: int | None = info.get("max_upload_bytes")
        except RemoteError as exc:
            self.http.close()
            if exc.status == 404:  # another kind of server, or a URL with a path the service does not have
                raise RemoteError(f"{self.url}: not a capeen service (GET /v1/model answered 404)", 404) from None
            raise
        except (ValueError, KeyError, TypeError) as exc:
            self.http.close()
            raise RemoteError(f"{self.url}: not a capeen service (GET /v1/model answered without its fields: "
                              f"{type(exc).__name__})") from None

    def stop(self) -> None:
        """Send nothing again: a request waiting to be retried gives up (a request on the wire still ends)."""
        self._stopped.set()

    def close(self) -> None:
        self.stop()
        self.http.close()

    def _send(self, method: str, path: str, **request) -> httpx.Response:
        """The answer to one request, sent again while the server is busy or away (module docstring); a
        refused request raises RemoteError, an answered one (200, or a batch's own 413) is returned."""
        backoff = FIRST_BACKOFF_S
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **request)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be restarting
                problem, wait = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None
            else:
                if response.status_code not in RETRIED_STATUSES:
                    if response.status_code == 200 or (response.status_code == 413 and path == "/caption/batch"):
                        return response
                    raise RemoteError(f"{self.url}{path}: {_problem(response)}", response.status_code)
                problem, wait = _problem(response), _retry_after(response)
            if attempt == self.retries:
                tries = "retry" if self.retries == 1 else "retries"
                raise RemoteError(f"{self.url}{path}: {problem} (given up after {self.retries} {tries})")
            if self._stopped.wait(backoff if wait is None else wait):
                raise RemoteError(f"{self.url}{path}: {problem} (the job stopped)")
            backoff = min(MAX_BACKOFF_S, 2 * backoff)
        raise AssertionError("unreachable")

    def caption(self, images: list[tuple[str, bytes]], options: dict[str, str]) -> list[dict]:
        """One result per image, in order: the server's ImageCaption or ImageFailure fields."""
        files = [("image", (name, data, mimetypes.guess_type(name)[0] or "application/octet-stream"))
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
        if len(images) == 1:  # over the body limit on its own: its own failure, as the server words it
            return [{"status": 413, "error": "upload_too_large", "detail": _problem(response).removeprefix("413 ")}]
        return [result for image in images for result in self.caption([image], options)]


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

    if args.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.retries < 0:
        raise UserError(f"--retries must be 0 or more, got {args.retries}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    headers = [parse_header(text) for text in args.header or ()]
    options = {"mode": args.mode}
    if args.threshold is not None:
        options["threshold"] = repr(args.threshold)
    if args.max_tokens is not None:
        options["max_tokens"] = str(args.max_tokens)
    try:
        server = Server(args.server, headers=headers, timeout_s=args.timeout, retries=args.retries)
    except RemoteError as exc:
        raise UserError(str(exc)) from None
    per_request = max(1, min(args.batch_size, server.max_images))
    # a server that does not say its limit still gets no file larger than a local run would read
    upload_limit = server.max_upload_bytes or MAX_FILE_BYTES
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

    pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="capeen-remote")
    in_flight: deque[_Chunk] = deque()
    chunk = _Chunk()
    finished = False
    try:
        for item in found:  # an image file's path, or why a folder or list could not be read
            try:
                if isinstance(item, ImageError):
                    raise item
                data = read_image_file(item, upload_limit)
            except ImageError as exc:  # named in its place, after the images before it
                problem = str(exc) if exc.kind != "too_large" or isinstance(item, ImageError) else \
                    f"{item}: larger than the server's upload limit of {upload_limit} bytes (CAPEEN_MAX_UPLOAD_BYTES)"
                chunk.entries.append((getattr(exc, "path", None) or item, problem))
            else:
                chunk.images.append((item.name, data))
                chunk.entries.append((item, len(chunk.images) - 1))
            if len(chunk.images) == per_request:
                chunk.results = pool.submit(server.caption, chunk.images, options)
                in_flight.append(chunk)
                chunk = _Chunk()
            while in_flight and (len(in_flight) >= args.concurrency or in_flight[0].results.done()):
                emit(in_flight.popleft())
            if not in_flight and not chunk.images and chunk.entries:  # failures that nothing waits before
                emit(chunk)  # (a folder of broken files must not pile up)
                chunk = _Chunk()
        if chunk.images:
            chunk.results = pool.submit(server.caption, chunk.images, options)
        in_flight.append(chunk)
        while in_flight:
            emit(in_flight.popleft())
        finished = True
    except RemoteError as exc:
        raise UserError(str(exc)) from None
    finally:  # a stopped job (an error, Ctrl-C, a closed pipe) sends nothing more and waits for no answer
        server.stop()
        pool.shutdown(wait=finished, cancel_futures=True)
        server.close()
    output.close()
    return 1 if failures else 0
