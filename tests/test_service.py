"""The HTTP service against a real uvicorn server on a loopback port: uploads, options, every error path,
concurrent requests answered each with its own caption, the bandit routes and the metrics.

Also home of the helpers the other service test modules share (`running_server`, `SlowEngine`, images).
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from models.engine import CaptionEngine
from models.images import load_image
from service.app import create_app
from service.connections import http_protocol
from service.settings import Settings

ADMIN_TOKEN = "s3cret-token"
UPLOAD_LIMIT = 256 * 1024


# ------------------------------------------------------------------------------------------------ shared helpers


@dataclass
class Server:
    url: str
    app: FastAPI
    uvicorn: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """What SIGTERM does: stop listening, finish in-flight requests, run the lifespan's shutdown."""
        self.uvicorn.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not shut down"


@contextmanager
def running_server(settings: Settings, *engines: CaptionEngine) -> Iterator[Server]:
    """`create_app(settings, engines)` served by uvicorn in a thread, on a loopback port bound beforehand."""
    app = create_app(settings, engines)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30,
                            http=http_protocol(settings.header_timeout_s))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive(), "the server failed to start"
        assert time.monotonic() < deadline, "the server did not start in time"
        time.sleep(0.02)
    running = Server(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server, thread)
    try:
        yield running
    finally:
        if thread.is_alive():
            running.stop()
        sock.close()


class SlowEngine:
    """A real engine whose batches take `delay` seconds longer: a model that cannot keep up."""

    def __init__(self, engine: CaptionEngine, delay: float) -> None:
        self._engine = engine
        self.delay = delay

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def caption_pixels(self, *args, **kwargs):
        time.sleep(self.delay)
        return self._engine.caption_pixels(*args, **kwargs)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise_image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def upload(data: bytes, name: str = "image.png", content_type: str = "image/png") -> dict:
    return {"image": (name, data, content_type)}


def metric_value(text: str, sample: str) -> float:
    """The value of one exposition line, e.g. `capeen_requests_total{route="/caption",status="200"}`; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == error, body
    assert body["detail"] and "\n" not in body["detail"]


@pytest.fixture(scope="session", name="tiny_engine")
def tiny_engine_fixture(tiny_checkpoint) -> CaptionEngine:
    """The tiny model, loaded once; other service test modules import this fixture."""
    return CaptionEngine.from_checkpoint(tiny_checkpoint, device="cpu")


# ------------------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[Server]:
    """Loads the checkpoint itself in the lifespan, as `capeen serve` without a preloaded engine would."""
    settings = Settings(checkpoint=tiny_checkpoint, max_batch_size=8, max_wait_ms=20, max_upload_bytes=UPLOAD_LIMIT,
                        max_pixels=4_000_000, admin_token=ADMIN_TOKEN, log_level="warning",
                        bandit_state=tmp_path_factory.mktemp("bandit") / "bandit.json",
                        bandit_thresholds="0.9,0.4,0.5")
    with running_server(settings) as running:
        yield running


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


# ------------------------------------------------------------------------------------------------ success


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_caption_each_format(client: httpx.Client, fmt: str) -> None:
    response = client.post("/caption", files=upload(encode(noise_image(1), fmt), f"x.{fmt.lower()}", "image/*"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"caption", "tokens", "exit_layers", "mean_exit_layer", "threshold", "arm", "policy",
                         "timings", "model", "request_id"}
    assert set(body["timings"]) == {"queue_ms", "encode_ms", "decode_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["queue_ms"] >= 0
    assert len(body["tokens"]) == len(body["exit_layers"]) and all(1 <= x <= 4 for x in body["exit_layers"])
    assert 1 <= body["mean_exit_layer"] <= 4
    assert body["model"] == "tiny-test" and body["policy"] == "cd-ucb" and isinstance(body["arm"], int)
    assert body["request_id"] == response.headers["x-request-id"]
    arms = client.get("/v1/bandit").json()["arms"]
    assert body["threshold"] == arms[body["arm"]]["threshold"]


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("P", "GIF"), ("RGBA", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "BMP")],
)
def test_caption_any_pillow_mode(client: httpx.Client, mode: str, fmt: str) -> None:
    image = noise_image(8).convert("L").convert(mode) if mode != "I;16" else Image.new("I;16", (40, 32), 30000)
    assert client.post("/caption", files=upload(encode(image, fmt))).status_code == 200


def test_exif_orientation_is_honoured(client: httpx.Client, tiny_engine: CaptionEngine) -> None:
    """A photo stored sideways with EXIF orientation 6 is captioned like the upright picture."""
    upright = noise_image(9, (40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, format="PNG", exif=exif)
    sideways = client.post("/caption", files=upload(buffer.getvalue()), data={"mode": "fixed"}).json()
    want = tiny_engine.caption([upright], 0.6).results[0]
    assert (sideways["tokens"], sideways["exit_layers"]) == (want.tokens, want.exit_layers)
    stored = tiny_engine.caption([upright.transpose(Image.Transpose.ROTATE_90)], 0.6).results[0]
    assert (stored.tokens, stored.exit_layers) != (want.tokens, want.exit_layers), "pick an image that tells"


def test_a_large_jpeg_upload_is_decoded_at_a_reduced_scale_unless_turned_off(client, tiny_engine, monkeypatch):
    # a 12-megapixel phone photo must not cost the service a full decode for a model that looks at 32 px
    import service.uploads

    decoded: list[tuple[int, int]] = []

    def recording_load_image(*args, **kwargs):
        image = load_image(*args, **kwargs)
        decoded.append(image.size)
        return image

    monkeypatch.setattr(service.uploads, "load_image", recording_load_image)
    photo = upload(encode(noise_image(3).resize((1200, 900)), "JPEG"))  # smooth: under the upload limit
    assert client.post("/caption", files=photo).status_code == 200
    side = tiny_engine.config.image_size
    assert decoded == [(150, 113)] and min(decoded[0]) >= side  # 1/8 of each side, still above the input
    settings = Settings(checkpoint=None, log_level="warning", jpeg_scaled_decode=False)
    with running_server(settings, tiny_engine) as whole, httpx.Client(base_url=whole.url, timeout=30) as other:
        assert other.post("/caption", files=photo).status_code == 200
    assert decoded[1:] == [(1200, 900)]


def test_modes_and_max_tokens(client: httpx.Client) -> None:
    image = upload(encode(noise_image(2)))
    full = client.post("/caption", files=image, data={"mode": "full"}).json()
    assert full["threshold"] is None and full["arm"] is None and full["policy"] is None
    assert set(full["exit_layers"]) <= {4} and full["mean_exit_layer"] == 4.0
    assert client.post("/caption", files=image, data={"mode": "fixed"}).json()["threshold"] == 0.6  # calibrated
    assert client.post("/caption", files=image, data={"mode": "fixed", "threshold": "0.5"}).json()["threshold"] == 0.5
    short = client.post("/caption", files=image, data={"mode": "fixed", "max_tokens": "2"}).json()
    assert len(short["tokens"]) <= 2


def test_request_id_is_echoed(client: httpx.Client) -> None:
    response = client.post("/caption", files=upload(encode(noise_image(3))), headers={"X-Request-ID": "trace-42"})
    assert response.json()["request_id"] == response.headers["x-request-id"] == "trace-42"
    assert client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"] != ""


def test_concurrent_requests_each_get_their_own_caption(server: Server, tiny_engine: CaptionEngine) -> None:
    images = [encode(noise_image(100 + i)) for i in range(12)]
    thresholds = [0.5, 0.6, 0.7] * 4  # per-request thresholds, decoded side by side in shared batches
    before = httpx.get(f"{server.url}/metrics").text

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            return await asyncio.gather(*(
                http.post("/caption", files=upload(data), data={"mode": "fixed", "threshold": str(t)},
                          headers={"X-Request-ID": f"req-{i}"})
                for i, (data, t) in enumerate(zip(images, thresholds, strict=True))))

    responses = asyncio.run(send_all())
    expected = [tiny_engine.caption([load_image(data)], t).results[0]
                for data, t in zip(images, thresholds, strict=True)]
    assert len({tuple(r.tokens) for r in expected}) > 3, "the images must get different captions to tell them apart"
    for i, (response, want) in enumerate(zip(responses, expected, strict=True)):
        body = response.json()
        assert body["request_id"] == f"req-{i}"
        assert (body["tokens"], body["exit_layers"], body["threshold"]) == (want.tokens, want.exit_layers,
                                                                             thresholds[i])
    after = httpx.get(f"{server.url}/metrics").text
    batches = metric_value(after, "capeen_batch_size_count") - metric_value(before, "capeen_batch_size_count")
    assert batches < 12, "concurrent requests should have shared batches"


# ------------------------------------------------------------------------------------------------ errors


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that claims width x height pixels, with no pixel data: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


# Unreadable uploads: (bytes, status, error), for POST /caption and for an image of POST /caption/batch.
BAD_IMAGES = [
    pytest.param(b"this is plain text, not a picture", 415, "not_image", id="not-image"),
    pytest.param(encode(noise_image(4))[:60], 422, "truncated", id="truncated"),
    pytest.param(b"", 422, "empty", id="empty"),
    pytest.param(png_claiming(30_000, 30_000), 413, "too_large", id="pixel-bomb"),
]


@pytest.mark.parametrize(("data", "status", "error"), BAD_IMAGES)
def test_bad_images(client: httpx.Client, data: bytes, status: int, error: str) -> None:
    assert_error(client.post("/caption", files=upload(data)), status, error)


def test_upload_over_limit_streamed_without_length(client: httpx.Client) -> None:
    boundary = "capeen-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()

    def body() -> Iterator[bytes]:  # a generator: sent chunked, with no Content-Length
        yield head
        for _ in range(UPLOAD_LIMIT // 16384 + 8):
            yield b"\0" * 16384
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/caption", content=body(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_error(response, 413, "upload_too_large")


def test_upload_over_limit_refused_from_content_length(server: Server) -> None:
    """Only the headers and a sliver of the promised 1 GB are sent: the 413 must come without the rest."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /caption HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 1000000000\r\n\r\n--b\r\n")
        reply = read_reply(conn)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"upload_too_large"' in reply


def read_reply(conn: socket.socket) -> bytes:
    """One whole HTTP response off a raw socket: headers and the Content-Length of body after them, which may
    come in more than one segment (or whatever came before the server closed)."""
    reply = b""
    while True:
        head, separator, body = reply.partition(b"\r\n\r\n")
        if separator:
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            if length is None or len(body) >= int(length.group(1)):
                return reply
        chunk = conn.recv(65536)
        if not chunk:
            return reply
        reply += chunk


def _closed_by_server_after(sock: socket.socket, limit_s: float = 10.0) -> float:
    """Seconds until the server closes `sock` (it sends nothing first); fails if it stays open `limit_s`."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    assert sock.recv(1024) == b"", "the server answered instead of closing"
    return time.monotonic() - start


def test_connections_that_never_finish_their_headers_are_closed(tiny_engine: CaptionEngine) -> None:
    """Slowloris: a silent connection, and one that stops mid-headers, are closed at the header deadline, while
    a request whose decode outlasts that deadline is still answered and its connection kept alive."""
    settings = Settings(header_timeout_s=0.5, log_level="warning")
    with running_server(settings, SlowEngine(tiny_engine, 1.0)) as server:
        address = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
        with socket.create_connection(address) as silent, socket.create_connection(address) as partial:
            partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
            for sock in (silent, partial):
                assert _closed_by_server_after(sock) < 5
        with httpx.Client(base_url=server.url, timeout=30) as http:
            answer = http.post("/caption", files=upload(encode(noise_image(0))))  # takes over a second
            assert answer.status_code == 200, answer.text
            assert http.get("/healthz").status_code == 200
        with socket.create_connection(address) as reused:  # after a response, the next headers get it too
            reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            reused.settimeout(5)
            response = b""
            while not response.endswith(b'{"status":"ok"}'):  # the whole answer: headers and body may part
                chunk = reused.recv(1024)
                assert chunk, response
                response += chunk
            assert response.startswith(b"HTTP/1.1 200")
            reused.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert _closed_by_server_after(reused) < 2  # well before uvicorn's own keep-alive timeout (5 s)


def test_client_leaving_mid_upload_is_counted_as_gone_not_as_a_bad_request(server: Server,
                                                                          client: httpx.Client) -> None:
    """Half an upload, then the connection closes: a 499 client_closed in the metrics, not a 400 bad_request."""
    def count(metrics: str, status: str, kind: str) -> tuple[float, float]:
        return (metric_value(metrics, f'capeen_requests_total{{route="/caption",status="{status}"}}'),
                metric_value(metrics, f'capeen_errors_total{{kind="{kind}"}}'))

    before = client.get("/metrics").text
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"POST /caption HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
                         b"filename=\"a.png\"\r\n\r\n" + encode(noise_image(0))[:100])
            time.sleep(0.1)  # the server is reading the body when the client goes
    deadline = time.monotonic() + 10
    while count(client.get("/metrics").text, "499", "client_closed")[0] < count(before, "499", "client_closed")[0] + 3:
        assert time.monotonic() < deadline, "the abandoned uploads were not counted"
        time.sleep(0.05)
    after = client.get("/metrics").text
    assert count(after, "499", "client_closed") == tuple(v + 3 for v in count(before, "499", "client_closed"))
    assert count(after, "400", "bad_request") == count(before, "400", "bad_request")
    assert client.post("/caption", files=upload(encode(noise_image(1)))).status_code == 200


@pytest.mark.parametrize(
    ("files", "data", "mentions"),
    [
        ("mode only", {}, "image: Field required"),  # a form with no image in it
        ("image", {"mode": "sideways"}, "mode"),
        ("image", {"mode": "fixed", "threshold": "0"}, "threshold"),
        ("image", {"mode": "fixed", "threshold": "1.5"}, "threshold"),
        ("image", {"mode": "fixed", "threshold": "high"}, "threshold"),
        ("image", {"mode": "fixed", "threshold": "nan"}, "threshold"),
        ("image", {"mode": "adaptive", "threshold": "0.7"}, "threshold"),
        ("image", {"max_tokens": "0"}, "max_tokens"),
        ("image", {"max_tokens": "100000"}, "max_tokens"),
        ("image", {"max_tokens": "many"}, "max_tokens"),
        ("text", {}, "image: must be a file part"),
        ("image", {"mod": "full"}, "mod: unknown field"),  # misspelt: not silently the default mode
        ("image", {"mode": ["full", "fixed"]}, "mode sent more than once"),
        ("image", {"mode": "fixed", "threshold": ""}, "threshold sent empty"),  # not the calibrated one unasked
        ("image", {"mod": ""}, "mod: unknown field"),  # what is wrong with it is its name
        ("two images", {}, "image sent more than once"),  # one caption per request, never a silent pick
    ],
)
def test_bad_options(client: httpx.Client, files, data: dict, mentions: str) -> None:
    if files == "image":
        files = upload(encode(noise_image(5)))
    elif files == "mode only":
        files = {"mode": (None, b"fixed")}
    elif files == "text":  # the image sent as a plain form field, not a file (no filename)
        files = {"image": (None, b"not a file")}
    elif files == "two images":
        files = [("image", ("a.png", encode(noise_image(5)), "image/png")),
                 ("image", ("b.png", encode(noise_image(6)), "image/png"))]
    response = client.post("/caption", files=files, data=data)
    assert_error(response, 422, "invalid_request")
    assert mentions in response.json()["detail"]


def test_hundreds_of_bad_fields_get_a_short_answer(client: httpx.Client) -> None:
    response = client.post("/caption", files=upload(encode(noise_image(5))), data={f"f{i}": "1" for i in range(900)})
    assert_error(response, 422, "invalid_request")
    detail = response.json()["detail"]
    assert detail.startswith("f0: unknown field") and detail.endswith("and 895 more problems") and len(detail) < 1000


@pytest.mark.parametrize("body", [
    {"content": encode(noise_image(5)), "headers": {"Content-Type": "image/png"}},  # the raw image
    {"json": {"image": "aGVsbG8="}},
    {"data": {"mode": "full"}},  # url-encoded: no file fits in it
    {"content": b""},
], ids=["raw-image", "json", "url-encoded", "no-content-type"])
def test_a_body_that_is_not_multipart_is_refused_with_how_to_send_one(client: httpx.Client, body: dict) -> None:
    response = client.post("/caption", **body)
    assert_error(response, 415, "not_multipart")
    assert "curl -F image=@" in response.json()["detail"]


def test_schema_says_multipart_with_no_other_fields(client: httpx.Client) -> None:
    body = client.get("/openapi.json").json()["paths"]["/caption"]["post"]["requestBody"]
    assert list(body["content"]) == ["multipart/form-data"]
    form = client.get("/openapi.json").json()["components"]["schemas"]["CaptionForm"]
    assert form["additionalProperties"] is False and form["required"] == ["image"]
    assert set(form["properties"]) == {"image", "mode", "threshold", "max_tokens"}


def test_options_in_the_query_string_are_refused_not_ignored(client: httpx.Client) -> None:
    response = client.post("/caption", params={"mode": "full"}, files=upload(encode(noise_image(5))))
    assert_error(response, 422, "invalid_request")
    assert "query parameters are not read (mode)" in response.json()["detail"]
    assert "-F mode=full" in response.json()["detail"]


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert_error(client.get("/nothing-here"), 404, "not_found")
    assert_error(client.get("/caption"), 405, "method_not_allowed")


def test_bandit_reset_needs_the_admin_token(client: httpx.Client) -> None:
    client.post("/caption", files=upload(encode(noise_image(6))))  # adaptive: the bandit learns
    assert client.get("/v1/bandit").json()["rounds"] > 0
    missing = client.post("/v1/bandit/reset")
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/v1/bandit/reset", headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    assert_error(client.post("/v1/bandit/reset", headers={"Authorization": "Basic eDp5"}), 401, "unauthorized")
    assert client.get("/v1/bandit").json()["rounds"] > 0
    reset = client.post("/v1/bandit/reset", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert reset.status_code == 200 and reset.json()["rounds"] == 0
    assert all(arm["pulls"] == 0 and arm["mean_reward"] is None for arm in reset.json()["arms"])


# ------------------------------------------------------------------------------------------------ other routes


def test_health_model_and_bandit_routes(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/v1/model").json() == {
        "name": "tiny-test", "layers": 4, "exits": [1, 2, 3, 4], "exit_offsets": [0.0, 0.0, 0.0, 0.0],
        "calibrated_threshold": 0.6, "kv_fill": "propagate", "device": "cpu", "devices": ["cpu"],
        "dtype": "float32", "vocab_size": 29, "image_size": 32, "max_tokens": 15, "max_images_per_request": 16,
        "max_upload_bytes": UPLOAD_LIMIT, "engines": 1}
    bandit = client.get("/v1/bandit").json()
    assert bandit["policy"] == "cd-ucb"
    thresholds = [arm["threshold"] for arm in bandit["arms"]]
    assert thresholds == [0.4, 0.5, 0.6, 0.9]  # CAPEEN_BANDIT_THRESHOLDS plus the calibrated threshold
    assert [arm["arm"] for arm in bandit["arms"]] == list(range(len(thresholds)))
    assert bandit["best"] in bandit["arms"]
    assert metric_value(client.get("/metrics").text, "capeen_bandit_threshold") == bandit["best"]["threshold"]


def test_metrics_exposition(client: httpx.Client) -> None:
    client.post("/caption", files=upload(encode(noise_image(7))))
    client.post("/caption", files=upload(b"not an image"))
    text = client.get("/metrics").text
    for name in ("capeen_requests_total", "capeen_request_duration_seconds_bucket",
                 "capeen_queue_duration_seconds_bucket", "capeen_batch_size_bucket", "capeen_queue_depth",
                 "capeen_batch_duration_seconds_bucket", "capeen_engine_compute_seconds_total",
                 "capeen_tokens_generated_total",
                 "capeen_token_exit_layer_bucket", "capeen_decoder_layers_computed_total",
                 "capeen_decoder_layers_full_total", "capeen_bandit_arm_pulls_total", "capeen_bandit_threshold",
                 "capeen_bandit_reward_bucket", "capeen_bandit_changes_detected_total", "capeen_errors_total",
                 "capeen_model_info"):
        assert f"\n{name}" in text, name
    assert metric_value(text, 'capeen_requests_total{route="/caption",status="415"}') >= 1
    assert metric_value(text, 'capeen_errors_total{kind="not_image"}') >= 1
    for path in ("/openapi.json", "/docs", "/no/such/route"):
        client.get(path)
    text = client.get("/metrics").text
    assert metric_value(text, 'capeen_requests_total{route="/openapi.json",status="200"}') >= 1
    assert metric_value(text, 'capeen_requests_total{route="/docs",status="200"}') >= 1
    assert metric_value(text, 'capeen_requests_total{route="unmatched",status="404"}') >= 1
    assert 'route="unmatched",status="200"' not in text
    tokens = metric_value(text, "capeen_tokens_generated_total")
    assert metric_value(text, "capeen_token_exit_layer_count") == tokens > 0
    assert metric_value(text, 'capeen_token_exit_layer_bucket{le="4.0"}') == tokens
    computed = metric_value(text, "capeen_decoder_layers_computed_total")
    assert metric_value(text, "capeen_decoder_layers_full_total") == 4 * tokens >= computed > 0
    assert 'capeen_model_info{' in text and 'name="tiny-test"' in text
    assert 'exits="1,2,3,4"' in text and 'devices="cpu"' in text and 'exit_offsets="0.0,0.0,0.0,0.0"' in text
    # every engine call is timed; the engine's own encode and decode time fits inside the call's wall time
    batches = metric_value(text, "capeen_batch_size_count")
    assert metric_value(text, 'capeen_batch_duration_seconds_count{engine="0"}') == batches >= 1
    encode_s = metric_value(text, 'capeen_engine_compute_seconds_total{engine="0",stage="encode"}')
    decode_s = metric_value(text, 'capeen_engine_compute_seconds_total{engine="0",stage="decode"}')
    assert 0 < encode_s and 0 < decode_s
    assert encode_s + decode_s <= metric_value(text, 'capeen_batch_duration_seconds_sum{engine="0"}')


def test_bandit_restarts_are_counted_once_each(tmp_path) -> None:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from bandit import make_policy
    from service.adaptive import AdaptiveThreshold
    from service.metrics import ServingMetrics

    registry = CollectorRegistry()
    adaptive = AdaptiveThreshold(
        lambda: make_policy("cd-ucb", [0.5, 0.9], exit_positions=(2, 4), num_layers=4, change_window=4,
                            change_threshold=2.0),
        ServingMetrics(registry, n_layer=4, max_batch_size=4), tmp_path / "bandit.json")

    def serve(final_confidence: float, requests: int) -> None:
        for _ in range(requests):  # one token, past the exit at layer 2 (0.3), to the final layer
            adaptive.update(adaptive.select(), SimpleNamespace(exit_confidences=[[0.3, final_confidence]],
                                                               exit_layers=[4]))

    def counted() -> float | None:
        return registry.get_sample_value("capeen_bandit_changes_detected_total")

    serve(0.4, 10)
    assert counted() == 0.0
    serve(0.99, 10)  # every arm's reward jumps from 0 to 0.59: one change
    assert len(adaptive.policy.changes) == 1 and counted() == 1.0
    adaptive.save()
    adaptive.reset()
    serve(0.99, 5)
    assert counted() == 1.0
    restored_registry = CollectorRegistry()
    restored = AdaptiveThreshold(lambda: make_policy("cd-ucb", [0.5, 0.9], exit_positions=(2, 4), num_layers=4,
                                                     change_window=4, change_threshold=2.0),
                                 ServingMetrics(restored_registry, n_layer=4, max_batch_size=4),
                                 tmp_path / "bandit.json")
    assert len(restored.policy.changes) == 1  # the snapshot keeps the history, the new process does not recount it
    assert restored_registry.get_sample_value("capeen_bandit_changes_detected_total") == 0.0


def test_a_periodic_save_that_waited_for_a_resets_does_not_write_again(tmp_path) -> None:
    # the saver saw "unsaved" just as a reset came, and queued behind the reset's own save: the file already
    # holds that state, so writing it again only churns the disk (and raced the reset's write in a test)
    from prometheus_client import CollectorRegistry

    from bandit import make_policy
    from service.adaptive import AdaptiveThreshold
    from service.metrics import ServingMetrics

    state = tmp_path / "bandit.json"
    adaptive = AdaptiveThreshold(lambda: make_policy("ucb1", [0.5, 0.9], exit_positions=(2, 4), num_layers=4),
                                 ServingMetrics(CollectorRegistry(), n_layer=4, max_batch_size=4), state)
    adaptive.reset()
    assert adaptive.unsaved()
    adaptive.save()  # the reset's
    written = state.stat().st_ino  # each write renames a new file into place: a new inode
    adaptive.save(only_if_unsaved=True)  # the saver's, a moment later
    assert state.stat().st_ino == written
    adaptive.reset()
    adaptive.save(only_if_unsaved=True)
    assert state.stat().st_ino != written and not adaptive.unsaved()


def test_arm_labels_are_the_thresholds_as_written_and_distinct() -> None:
    from bandit import Arm
    from service.adaptive import arm_label

    assert [arm_label(Arm(i, t)) for i, t in enumerate((0.5, 0.55, 0.7, 0.99))] == ["0.5", "0.55", "0.7", "0.99"]
    assert arm_label(Arm(0, 0.5)) != arm_label(Arm(1, 0.5000001))  # one label for both before


def test_error_and_arm_series_exist_at_zero_before_their_first_event(tiny_engine) -> None:
    """Prometheus's first sample of a series that appears with its first event already holds that event, so
    rate() and increase() never count it: a first burst of 503s showed as no error at all."""
    with running_server(Settings(bandit_thresholds="0.4,0.5", log_level="warning"), tiny_engine) as fresh:
        text = httpx.get(f"{fresh.url}/metrics", timeout=30).text
    for route in ("/caption", "/caption/batch"):
        for status in ("200", "413", "415", "422", "499", "500", "503", "504"):
            assert f'capeen_requests_total{{route="{route}",status="{status}"}} 0.0' in text
        assert f'capeen_request_duration_seconds_count{{route="{route}",status="200"}} 0.0' in text
    from service.errors import ERROR_KINDS

    for kind in ERROR_KINDS:
        assert f'capeen_errors_total{{kind="{kind}"}} 0.0' in text
    for arm in ("0.4", "0.5", "0.6"):  # the grid and the calibrated threshold
        assert f'capeen_bandit_arm_pulls_total{{arm="{arm}"}} 0.0' in text


def test_every_error_kind_the_service_sends_is_listed() -> None:
    import re
    from pathlib import Path

    from service.errors import _STATUS_KINDS, ERROR_KINDS
    from service.uploads import IMAGE_ERROR_STATUS

    root = Path(__file__).resolve().parent.parent / "service"
    source = "\n".join(path.read_text() for path in root.rglob("*.py"))
    sent = set(re.findall(r'ServiceError\(\d{3}, "(\w+)"', source))
    sent |= set(re.findall(r'error_response\(request, \d{3}, "(\w+)"', source))
    sent |= set(re.findall(r'\(\d{3}, "(\w+)", (?:RETRY_AFTER|None)\)', source))  # the batcher's outcomes
    sent |= set(IMAGE_ERROR_STATUS) | set(_STATUS_KINDS.values()) | {"http_error"}
    assert len(sent) > 15 and sent == set(ERROR_KINDS)


@pytest.mark.parametrize("level", ["info", "debug"])
def test_log_level_raises_our_loggers_only(level: str) -> None:
    """CAPEEN_LOG_LEVEL=debug is for reading what the service does: torch's and PIL's internals stay out."""
    import subprocess
    import sys

    script = f"""
import logging
from service.log_setup import configure_logging
configure_logging({level!r})
for name in ("service.batcher", "models.kernels", "bandit.store", "torch._subclasses", "PIL.PngImagePlugin"):
    logging.getLogger(name).log(logging.{level.upper()}, "from %s", name)
    logging.getLogger(name).warning("warned by %s", name)
"""
    written = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stderr
    for ours in ("service.batcher", "models.kernels", "bandit.store"):
        assert f"{level.upper()} {ours}: from {ours}" in written
    for theirs in ("torch._subclasses", "PIL.PngImagePlugin"):
        assert f"from {theirs}" not in written
        assert f"WARNING {theirs}: warned by {theirs}" in written
