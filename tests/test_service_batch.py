"""POST /caption/batch against a real uvicorn server: several images in one request, each answered with its
own caption (the same as POST /caption gives it) or with why it has none, the request's own errors, and its
images queued all together or not at all."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.test_service import (  # noqa: F401  (the tiny_engine fixture)
    BAD_IMAGES,
    Server,
    SlowEngine,
    assert_error,
    encode,
    metric_value,
    noise_image,
    read_reply,
    running_server,
    tiny_engine_fixture,
)
from tests.test_service_load import StartedEngine

UPLOAD_LIMIT = 256 * 1024
MAX_IMAGES = 4


def images(*parts: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx's `files` for image parts (filename, bytes), all named image."""
    return [("image", (name, data, "image/png")) for name, data in parts]


@pytest.fixture(scope="module")
def server(tiny_engine) -> Iterator[Server]:
    settings = Settings(max_batch_size=8, max_wait_ms=20, max_upload_bytes=UPLOAD_LIMIT, max_pixels=4_000_000,
                        max_images_per_request=MAX_IMAGES, bandit_thresholds="0.9,0.4,0.5", log_level="warning")
    with running_server(settings, tiny_engine) as running:
        yield running


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def test_each_image_gets_the_caption_a_request_of_its_own_gets_all_in_one_engine_call(client) -> None:
    parts = [(f"photo-{i}.png", encode(noise_image(i))) for i in range(MAX_IMAGES)]
    alone = [client.post("/caption", files=images(part), data={"mode": "fixed"}).json() for part in parts]
    calls_before = metric_value(client.get("/metrics").text, "capeen_batch_size_count")

    response = client.post("/caption/batch", files=images(*parts), data={"mode": "fixed"},
                           headers={"X-Request-ID": "batch-1"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["captioned"], body["failed"], body["request_id"]) == (MAX_IMAGES, 0, "batch-1")
    assert body["model"] == alone[0]["model"]
    assert [r["index"] for r in body["results"]] == list(range(MAX_IMAGES))
    assert [r["filename"] for r in body["results"]] == [name for name, _ in parts]
    for result, single in zip(body["results"], alone, strict=True):
        for field in ("caption", "tokens", "exit_layers", "mean_exit_layer", "threshold"):
            assert result[field] == single[field], field
    # the four were queued together, so one engine call decoded them all
    assert metric_value(client.get("/metrics").text, "capeen_batch_size_count") == calls_before + 1


def test_options_hold_for_every_image(client) -> None:
    layers = client.get("/v1/model").json()["layers"]
    parts = [(f"{i}.png", encode(noise_image(i))) for i in range(3)]
    body = client.post("/caption/batch", files=images(*parts), data={"mode": "full", "max_tokens": "2"}).json()
    for result in body["results"]:
        assert result["threshold"] is None and set(result["exit_layers"]) <= {layers}
        assert len(result["tokens"]) <= 2


def test_adaptive_mode_gives_each_image_its_own_arm_and_bandit_round(client) -> None:
    rounds = client.get("/v1/bandit").json()["rounds"]
    body = client.post("/caption/batch", files=images(*[(f"{i}.png", encode(noise_image(i))) for i in range(3)]))
    assert body.status_code == 200, body.text
    results = body.json()["results"]
    assert all(r["arm"] is not None and r["policy"] for r in results)
    deadline = time.monotonic() + 5  # learnt in the engine thread, after the answers are sent
    while client.get("/v1/bandit").json()["rounds"] < rounds + 3:
        assert time.monotonic() < deadline, "the bandit did not learn from every image"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [*BAD_IMAGES,  # and one over one image's bytes, not over the request's
     pytest.param(encode(noise_image(5, (300, 300))), 413, "upload_too_large", id="over-upload-limit")],
)
def test_an_unreadable_image_gets_its_failure_and_the_others_their_captions(client, data, status, error) -> None:
    errors_before = metric_value(client.get("/metrics").text, f'capeen_errors_total{{kind="{error}"}}')
    parts = [("good-0.png", encode(noise_image(0))), ("bad.png", data), ("good-1.png", encode(noise_image(1)))]

    response = client.post("/caption/batch", files=images(*parts), data={"mode": "full"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["captioned"], body["failed"]) == (2, 1)
    good_0, bad, good_1 = body["results"]
    assert "caption" in good_0 and "caption" in good_1 and "caption" not in bad
    assert (bad["index"], bad["filename"], bad["status"], bad["error"]) == (1, "bad.png", status, error)
    assert bad["detail"] and "\n" not in bad["detail"]
    assert metric_value(client.get("/metrics").text, f'capeen_errors_total{{kind="{error}"}}') == errors_before + 1


def test_a_request_of_unreadable_images_only_is_answered_with_their_failures(client) -> None:
    body = client.post("/caption/batch", files=images(("a.txt", b"text"), ("b.png", b""))).json()
    assert (body["captioned"], body["failed"]) == (0, 2)
    assert [r["error"] for r in body["results"]] == ["not_image", "empty"]


def test_the_request_body_may_hold_each_image_at_the_upload_limit(client) -> None:
    """Two images of about 200 KB each pass the body limit of a batch (4 x 256 KiB), not that of one image."""
    big = [(f"big-{i}.png", encode(noise_image(10 + i, (260, 260)))) for i in range(2)]
    assert all(150_000 < len(data) <= UPLOAD_LIMIT for _, data in big)
    assert client.post("/caption/batch", files=images(*big)).json()["captioned"] == 2


def test_a_body_over_the_batch_limit_is_refused_from_its_content_length(server: Server) -> None:
    """Only the headers and a sliver of the promised body are sent: the 413 must come without the rest."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /caption/batch HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: %d\r\n\r\n--b\r\n" % (MAX_IMAGES * (UPLOAD_LIMIT + 64 * 1024) + 1))
        reply = read_reply(conn)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"upload_too_large"' in reply and b"CAPEEN_MAX_IMAGES_PER_REQUEST" in reply


@pytest.mark.parametrize(
    ("files", "data", "mentions"),
    [
        (images(*[(f"{i}.png", b"x") for i in range(MAX_IMAGES + 1)]), {}, "at most 4"),
        (images(("a.png", b"x")), {"mode": ["full", "fixed"]}, "mode"),
        (images(("a.png", b"x")), {"mode": "full", "threshold": "0.5"}, "threshold"),
        (images(("a.png", b"x")), {"colour": "red"}, "colour"),
        (images(("a.png", b"x")), {"mode": ""}, "mode"),
        ([("picture", ("a.png", b"x", "image/png"))], {}, "image"),
        (None, {"image": "not a file"}, "image"),
    ],
    ids=["too-many-images", "option-twice", "threshold-without-fixed", "unknown-field", "empty-option",
         "no-image-field", "image-as-text"],
)
def test_what_is_wrong_with_the_request_itself_refuses_all_of_it(client, files, data, mentions) -> None:
    multipart = files or [("other", ("x.bin", b"", "application/octet-stream"))]  # keeps the body multipart
    response = client.post("/caption/batch", files=multipart, data=data)
    assert_error(response, 422, "invalid_request")
    assert mentions in response.json()["detail"]


def test_more_parts_than_the_form_parser_takes_are_a_bad_request(client) -> None:
    response = client.post("/caption/batch", files=images(*[(f"{i}.png", b"x") for i in range(1001)]))
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize("cut, trailer", [(0, b""), (500, b""), (0, b" --b-- ")],
                         ids=["after-the-last-part", "inside-the-last-image", "after-a-lookalike-delimiter"])
def test_a_body_cut_before_its_closing_boundary_loses_no_image_without_a_word(client, cut: int, trailer) -> None:
    """The form parser drops an unfinished last part; the three images must not come back as two captions, even
    when the last image's bytes hold the closing delimiter's text (not at the start of a line, so not one)."""
    def part(name: str, data: bytes) -> bytes:
        return (f'--b\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    last = encode(noise_image(2)) + trailer  # a PNG decoder ignores what follows its end
    body = part("a.png", encode(noise_image(0))) + part("b.png", encode(noise_image(1))) + part("c.png", last)
    body = body[:-2] if not cut else body[:len(body) - len(last) + cut]
    for path in ("/caption/batch", "/caption"):
        response = client.post(path, content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert_error(response, 400, "bad_request")
        assert "closing boundary" in response.json()["detail"]


def test_the_schema_says_what_fails_a_batch_request_as_a_whole(client) -> None:
    responses = client.get("/openapi.json").json()["paths"]["/caption/batch"]["post"]["responses"]
    assert "CAPEEN_MAX_IMAGES_PER_REQUEST" in responses["422"]["description"]
    assert "among the results" in responses["413"]["description"]
    assert "engine_failed" in responses["500"]["description"]


def test_a_body_that_is_not_multipart_is_refused(client) -> None:
    assert_error(client.post("/caption/batch", content=encode(noise_image(0)),
                             headers={"Content-Type": "image/png"}), 415, "not_multipart")


def test_the_images_are_queued_all_together_or_not_at_all(tiny_engine) -> None:
    """One request is being decoded (0.7 s per image, one image per engine call) and two wait, in a queue of
    three places: a request of two readable images (and one not) finds one free, and is refused without taking
    it, nor counting its unreadable image among the errors its client never saw; one image is then queued and
    captioned."""
    settings = Settings(max_batch_size=1, queue_size=3, max_images_per_request=3, log_level="warning")
    engine = StartedEngine(tiny_engine, 0.7)
    with running_server(settings, engine) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        answers: list[int] = []

        def post_one(seed: int) -> None:
            answers.append(http.post("/caption", files=images(("x.png", encode(noise_image(seed))))).status_code)

        threads = [threading.Thread(target=post_one, args=(seed,)) for seed in range(3)]
        threads[0].start()
        assert engine.started.wait(10)
        for thread in threads[1:]:
            thread.start()
        deadline = time.monotonic() + 5
        while metric_value(http.get("/metrics").text, "capeen_queue_depth") < 2:
            assert time.monotonic() < deadline, "the other two requests were not queued"
            time.sleep(0.02)

        parts = [("a.png", encode(noise_image(3))), ("b.png", encode(noise_image(4))), ("c.txt", b"no image")]
        refused = http.post("/caption/batch", files=images(*parts))
        assert_error(refused, 503, "queue_full")
        assert refused.headers["retry-after"] == "1"
        text = http.get("/metrics").text
        assert metric_value(text, "capeen_queue_depth") == 2  # none of the two was left
        assert metric_value(text, 'capeen_errors_total{kind="not_image"}') == 0

        assert http.post("/caption/batch", files=images(parts[0])).json()["captioned"] == 1
        for thread in threads:
            thread.join(30)
        assert answers == [200, 200, 200]


def test_a_client_that_leaves_while_its_images_are_decoded_stops_their_decoding(tiny_engine, monkeypatch) -> None:
    """Six images decoded one at a time, 0.3 s each; the client gives up after 0.45 s. The images whose turn comes
    after that are not decoded, and the request is counted as a client gone."""
    from service.routes import caption

    decoded: list[float] = []

    def slow_pixels(*args, **kwargs):
        time.sleep(0.3)
        decoded.append(time.monotonic())
        return real_pixels(*args, **kwargs)

    real_pixels = caption.image_pixels
    monkeypatch.setattr(caption, "image_pixels", slow_pixels)
    settings = Settings(decode_concurrency=1, log_level="warning")
    with running_server(settings, tiny_engine) as server:
        six = [(f"{i}.png", encode(noise_image(i))) for i in range(6)]
        with httpx.Client(base_url=server.url, timeout=0.45) as impatient, pytest.raises(httpx.TimeoutException):
            impatient.post("/caption/batch", files=images(*six))
        with httpx.Client(base_url=server.url, timeout=30) as http:
            deadline = time.monotonic() + 5
            while metric_value(http.get("/metrics").text,
                               'capeen_requests_total{route="/caption/batch",status="499"}') < 1:
                assert time.monotonic() < deadline, "the client that left was not noticed"
                time.sleep(0.05)
        time.sleep(0.4)  # a decode under way when the client left ends
        assert len(decoded) <= 3, decoded


def test_a_request_past_its_deadline_is_answered_504_and_its_images_leave_the_queue(tiny_engine, caplog) -> None:
    """Four images at 0.6 s each, one per engine call, cannot all be captioned within a 1.5 s deadline. The
    server's log stays quiet about it: a deadline is an answer, not an error of the server."""
    settings = Settings(max_batch_size=1, request_timeout_s=1.5, log_level="warning")
    with running_server(settings, SlowEngine(tiny_engine, 0.6)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        four = [(f"{i}.png", encode(noise_image(i))) for i in range(4)]
        assert_error(http.post("/caption/batch", files=images(*four)), 504, "timeout")
        assert metric_value(http.get("/metrics").text, "capeen_queue_depth") == 0
        time.sleep(0.7)  # the engine call under way at the deadline ends; the images behind it are skipped
        started = time.monotonic()
        assert http.post("/caption", files=images(("x.png", encode(noise_image(9))))).status_code == 200
        assert time.monotonic() - started < 1.2
        assert metric_value(http.get("/metrics").text, "capeen_batch_size_count") <= 4  # 2 of the 4, then this one
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def test_the_model_route_says_how_many_images_a_request_may_hold(client) -> None:
    assert client.get("/v1/model").json()["max_images_per_request"] == MAX_IMAGES


def test_the_image_limit_gives_way_to_a_smaller_queue_unless_it_was_set_on_purpose() -> None:
    assert Settings(queue_size=8).images_per_request == 8
    assert Settings(queue_size=64, max_images_per_request=20).images_per_request == 20
    with pytest.raises(ValidationError, match="could never be queued"):
        Settings(queue_size=8, max_images_per_request=9)
    with pytest.raises(ValidationError, match="less than or equal to 1000"):  # the form parser's limit on parts
        Settings(queue_size=5000, max_images_per_request=1001)
