"""`capeen caption --server URL`: the same captions, lines and exit status as a local run, through a real
uvicorn server; back-pressure waited out; the retry rules of `service.client.Server` on a mock transport."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.client import RemoteError, Server
from service.settings import Settings
from tests.test_cli import assert_one_line_error, run, screen
from tests.test_service import (  # noqa: F401  (the tiny_engine fixture)
    SlowEngine,
    encode,
    metric_value,
    noise_image,
    running_server,
    tiny_engine_fixture,
)
from tests.test_service_load import StartedEngine

UPLOAD_LIMIT = 64 * 1024
MAX_IMAGES = 3


@pytest.fixture(scope="module")
def server(tiny_engine) -> Iterator:
    settings = Settings(max_batch_size=8, max_wait_ms=5, max_upload_bytes=UPLOAD_LIMIT,
                        max_images_per_request=MAX_IMAGES, bandit_thresholds="0.9,0.4,0.5", log_level="warning")
    with running_server(settings, tiny_engine) as running:
        yield running


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Eleven readable images of different captions, and next to them every kind of file that has none."""
    root = tmp_path_factory.mktemp("remote")
    for index in range(11):
        (root / f"img-{index:02d}.png").write_bytes(encode(noise_image(index)))
    png = (root / "img-00.png").read_bytes()
    (root / "img-03-empty.png").write_bytes(b"")
    (root / "img-05-notes.png").write_text("not an image\n")
    (root / "img-07-truncated.png").write_bytes(png[: len(png) // 2])
    return root


def test_captions_through_the_server_are_the_local_ones_in_the_same_order(capsys, server, folder, tiny_checkpoint,
                                                                         tmp_path):
    # three images a request and three requests in flight: answers come back in any order, lines do not
    missing = tmp_path / "missing.png"
    rc, out, err = run(capsys, "caption", folder, missing, "--server", server.url, "--jsonl", "--batch-size", 3,
                       "--concurrency", 3)
    _, local_out, local_err = run(capsys, "caption", folder, missing, "--checkpoint", tiny_checkpoint,
                                  "--device", "cpu", "--jsonl")

    assert rc == 1
    remote, local = [json.loads(line) for line in out.splitlines()], [json.loads(line) for line in local_out.splitlines()]
    assert [line["image"] for line in remote] == [line["image"] for line in local]
    assert len(remote) == 15 and len({line.get("caption") for line in remote}) > 3
    for ours, theirs in zip(remote, local, strict=True):
        if "error" in theirs:
            assert ours == theirs  # an unreadable file is reported in the words a local run uses
        else:
            assert {key: ours[key] for key in ("caption", "tokens", "exit_layers", "threshold")} == \
                   {key: theirs[key] for key in ("caption", "tokens", "exit_layers", "threshold")}
            assert ours["policy"] is None and ours["mean_exit_layer"] > 0
    assert screen(err) == screen(local_err)  # one line each, in the order of the inputs


def test_a_file_over_the_servers_upload_limit_is_not_sent_and_the_others_are_captioned(capsys, server, folder,
                                                                                     tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(encode(noise_image(1, size=(400, 400))))
    assert huge.stat().st_size > UPLOAD_LIMIT
    batches = 'capeen_requests_total{route="/caption/batch",status="200"}'
    before = metric_value(httpx.get(f"{server.url}/metrics").text, batches)

    rc, out, err = run(capsys, "caption", folder / "img-01.png", huge, folder / "img-02.png", "--server", server.url)

    assert rc == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(folder / "img-01.png"), str(folder / "img-02.png")]
    assert_one_line_error(err, str(huge), f"larger than the server's upload limit of {UPLOAD_LIMIT} bytes")
    # one request for the two others: the huge file went nowhere
    assert metric_value(httpx.get(f"{server.url}/metrics").text, batches) == before + 1


def test_adaptive_mode_asks_the_servers_bandit(capsys, server, folder):
    rc, out, _ = run(capsys, "caption", folder / "img-01.png", "--server", server.url, "--mode", "adaptive", "--json")
    assert rc == 0
    [item] = json.loads(out)
    assert item["policy"] == "cd-ucb" and item["arm"] is not None


def test_a_full_queue_is_waited_out_and_every_image_is_captioned_once(capsys, tiny_engine, folder):
    """A server with room for two images and one engine call at a time, 0.1 s each, and six requests in
    flight: most are refused with 503 at first; every image still gets its caption, once, in order."""
    settings = Settings(max_batch_size=1, queue_size=2, max_images_per_request=2, log_level="warning")
    paths = sorted(folder.glob("img-??.png"))
    with running_server(settings, SlowEngine(tiny_engine, 0.1)) as slow:
        rc, out, err = run(capsys, "caption", *paths, "--server", slow.url, "--jsonl", "--concurrency", 6)
        metrics = httpx.get(f"{slow.url}/metrics").text
    assert (rc, err) == (0, "")
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(path) for path in paths]
    assert metric_value(metrics, 'capeen_requests_total{route="/caption/batch",status="503"}') > 0
    assert metric_value(metrics, "capeen_captions_total") == len(paths)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("argv, fragments", [
    (["--server", "localhost:8000"], ["--server localhost:8000", "http://"]),
    (["--server", "{nobody}", "--retries", "0"], ["Connection refused", "given up after 0 retries"]),
    (["--server", "{server}", "--device", "cpu", "--kv-fill", "deferred"], ["--device, --kv-fill", "--server"]),
    (["--server", "{server}", "--checkpoint", "x"], ["--checkpoint", "server's own settings"]),
    (["--server", "{server}", "--engines", "2"], ["--engines", "server's own settings"]),
    (["--concurrency", "4"], ["--concurrency: only with --server URL"]),
    (["--header", "Authorization: Bearer x"], ["--header: only with --server URL"]),
    (["--mode", "adaptive"], ["--mode adaptive: only with --server URL"]),
    (["--server", "{server}", "--header", "no colon"], ["--header 'no colon'", "Name: value"]),
    (["--server", "{server}", "--concurrency", "0"], ["--concurrency must be at least 1"]),
    (["--server", "{server}", "--timeout", "nan"], ["--timeout must be a positive number"]),
    (["--server", "{server}", "--timeout", "inf"], ["--timeout must be a positive number"]),
    (["--server", "http://127.0.0.1:80x"], ["--server http://127.0.0.1:80x", "port"]),
    (["--server", "{server}", "--header", "X-Token: a\u00a0b"], ["--header X-Token", "printable ASCII"]),
    (["--server", "{server}", "--header", "Content-Length: 5"], ["--header Content-Length", "client itself"]),
    (["--server", "{server}", "--threshold", "1.5"], ["/caption/batch: 422", "threshold"]),
])
def test_bad_remote_options_exit_2_with_one_line(capsys, server, folder, argv, fragments):
    argv = [arg.format(server=server.url, nobody=f"http://127.0.0.1:{free_port()}") for arg in argv]
    rc, out, err = run(capsys, "caption", folder / "img-01.png", *argv)
    assert (rc, out) == (2, "")
    assert_one_line_error(err, *fragments)


def test_a_server_that_goes_away_ends_the_job_with_one_line_after_the_captions_it_gave(capsys, tiny_engine, folder,
                                                                                     tmp_path):
    paths = sorted(folder.glob("img-??.png")) * 4  # 44 requests of at least 0.05 s: more than the server lasts
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(map(str, paths)) + "\n")
    settings = Settings(max_batch_size=1, log_level="warning")
    engine = StartedEngine(tiny_engine, 0.05)
    with running_server(settings, engine) as going:
        def stop_once_captioning() -> None:  # as SIGTERM does: the requests in flight are answered
            assert engine.started.wait(60)
            time.sleep(0.3)
            going.stop()

        stopper = threading.Thread(target=stop_once_captioning)
        stopper.start()
        rc, out, err = run(capsys, "caption", "--files-from", listed, "--server", going.url, "--json",
                           "--batch-size", 1, "--concurrency", 1, "--retries", 1)
        stopper.join()
    assert rc == 2
    printed = [item["image"] for item in json.loads(out)]  # still one JSON array, closed
    assert 0 < len(printed) < len(paths) and printed == [str(path) for path in paths[: len(printed)]]
    assert_one_line_error(err, "/caption/batch", "given up after 1 retry")


# ----- the retry rules, on a mock transport --------------------------------------------------------------------
CAPTION = {"caption": "a red circle", "tokens": ["a", "red", "circle"], "exit_layers": [1, 2, 1],
           "mean_exit_layer": 1.5, "threshold": 0.7, "arm": None, "policy": None}


def mock_server(answers: list, retries: int = 8, limits: dict | None = None, record_waits: bool = True,
                **kwargs) -> tuple[Server, list[httpx.Request]]:
    """A `Server` whose GET /v1/model is answered with `limits` (read at each call) and whose other requests get
    `answers` in turn (an exception is raised); with `record_waits`, its waits are recorded, not slept."""
    limits = limits if limits is not None else {"name": "m", "max_images_per_request": 4, "max_upload_bytes": 1000}
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path == "/v1/model":
            return httpx.Response(200, json=limits)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    server = Server("http://capeen.test", retries=retries, transport=httpx.MockTransport(handle), **kwargs)
    if record_waits:
        server.waits = []
        server._sleep = lambda seconds: server.waits.append(seconds) or False
    return server, sent


def ok(count: int = 1) -> httpx.Response:
    return httpx.Response(200, json={"results": [{"index": i, "filename": "x.png", **CAPTION} for i in range(count)]})


def test_failures_that_may_pass_are_retried_after_retry_after_or_a_doubling_backoff():
    server, sent = mock_server([
        httpx.Response(503, headers={"Retry-After": "2"}, json={"error": "queue_full", "detail": "full"}),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(504, json={"error": "timeout", "detail": "late"}),
        httpx.ConnectError("[Errno 111] Connection refused"),
        ok(),
    ])
    assert server.caption([("a.png", b"png")], {"mode": "fixed"})[0]["caption"] == "a red circle"
    # Retry-After with up to half again at random, then the backoff doubling from 0.5 s
    assert 2.0 <= server.waits[0] <= 3.0 and server.waits[1:] == [1.0, 2.0, 4.0]
    assert [request.url.path for request in sent] == ["/v1/model"] + ["/caption/batch"] * 5


def test_back_pressure_is_waited_out_without_using_up_the_retries_and_narrows_what_is_in_flight():
    busy = httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "queue_full", "detail": "full"})
    server, _ = mock_server([busy, busy, httpx.Response(429, text="slow down"), ok(), ok()], retries=0,
                            concurrency=8)
    assert server.caption([("a.png", b"png")], {})[0]["caption"] == "a red circle"
    assert server.window.size == 2  # 8, halved at each of three refusals to 1, then one more for the answer
    server.caption([("a.png", b"png")], {})
    assert server.window.size == 3


def test_back_pressure_that_never_ends_gives_up_after_its_limit(monkeypatch):
    monkeypatch.setattr("service.client.BACKPRESSURE_LIMIT_S", 5.0)
    busy = httpx.Response(503, headers={"Retry-After": "2"}, json={"error": "queue_full", "detail": "full"})
    server, _ = mock_server([busy] * 10)
    with pytest.raises(RemoteError, match="503 full .still refused after 5 s."):
        server.caption([("a.png", b"png")], {})
    assert 1 <= len(server.waits) <= 2 and sum(server.waits) <= 5.0  # waits of 2 to 3 s, until 5 s would pass


@pytest.mark.parametrize("cause, hopeless", [(socket.gaierror(-2, "Name or service not known"), True),
                                             (ssl.SSLError(1, "WRONG_VERSION_NUMBER"), True),
                                             (ConnectionRefusedError(111, "Connection refused"), False)])
def test_a_connection_that_cannot_succeed_is_not_retried(cause, hopeless):
    error = httpx.ConnectError(str(cause))
    error.__cause__ = cause
    server, sent = mock_server([error, ok()])
    if hopeless:
        with pytest.raises(RemoteError, match="ConnectError"):
            server.caption([("a.png", b"png")], {})
        assert (len(sent), server.waits) == (2, [])
    else:
        assert server.caption([("a.png", b"png")], {})[0]["caption"] == "a red circle"


def test_a_server_now_taking_fewer_images_per_request_gets_smaller_requests():
    limits = {"name": "m", "max_images_per_request": 4, "max_upload_bytes": 1000}
    too_many = httpx.Response(422, json={"error": "invalid_request", "detail": "3 images in one request; at most 2"})
    server, sent = mock_server([too_many, ok(2), ok(1)], limits=limits)
    limits["max_images_per_request"] = 2  # the server restarted with CAPEEN_MAX_IMAGES_PER_REQUEST=2
    results = server.caption([("a.png", b"a"), ("b.png", b"b"), ("c.png", b"c")], {})
    assert len(results) == 3 and server.max_images == 2
    assert [request.url.path for request in sent] == ["/v1/model", "/caption/batch", "/v1/model",
                                                      "/caption/batch", "/caption/batch"]
    bad_option = httpx.Response(422, json={"error": "invalid_request", "detail": "threshold: too high"})
    server, _ = mock_server([bad_option])
    with pytest.raises(RemoteError, match="422 threshold: too high"):
        server.caption([("a.png", b"a")], {})


def test_a_file_name_that_is_not_utf8_is_sent_all_the_same():
    server, sent = mock_server([ok()])
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name, as the file system gives it
    server.caption([(name, b"png")], {})
    assert b'filename="caf\xef\xbf\xbd.png"' in sent[1].content


def test_a_server_still_failing_after_the_retries_is_one_line_naming_its_last_answer():
    server, _ = mock_server([httpx.Response(500, json={"error": "engine_failed", "detail": "RuntimeError: boom"})] * 3,
                            retries=2)
    with pytest.raises(RemoteError, match=r"/caption/batch: 500 RuntimeError: boom \(given up after 2 retries\)"):
        server.caption([("a.png", b"png")], {})


def test_a_refused_request_is_not_sent_again():
    server, sent = mock_server([httpx.Response(401, json={"error": "unauthorized", "detail": "token needed"})])
    with pytest.raises(RemoteError, match="401 token needed"):
        server.caption([("a.png", b"png")], {})
    assert len(sent) == 2


def test_a_request_over_the_body_limit_is_sent_again_image_by_image():
    too_large = httpx.Response(413, json={"error": "upload_too_large", "detail": "image: over 1000 bytes"})
    server, sent = mock_server([
        too_large,
        httpx.Response(200, json={"results": [{"index": 0, "filename": "a.png", **CAPTION}]}),
        too_large,
    ])
    results = server.caption([("a.png", b"small"), ("b.png", b"large")], {})
    assert results[0]["caption"] == "a red circle"
    assert results[1] == {"status": 413, "error": "upload_too_large", "detail": "image: over 1000 bytes"}
    assert [len(request.content) > 0 for request in sent[1:]] == [True] * 3


@pytest.mark.parametrize("answer", [httpx.Response(200, text="<html>welcome</html>"),
                                    httpx.Response(200, json={"results": []}),
                                    httpx.Response(200, json={"results": "nothing"})])
def test_a_200_without_a_result_per_image_is_one_line_not_a_crash(answer):
    server, _ = mock_server([answer])
    with pytest.raises(RemoteError, match="answered 200 without a result for each of the 1 images"):
        server.caption([("a.png", b"png")], {})


def test_headers_go_with_every_request():
    server, sent = mock_server([httpx.Response(200, json={"results": []})],
                               headers=[("Authorization", "Bearer t0ken")])
    server.caption([], {})
    assert [request.headers["authorization"] for request in sent] == ["Bearer t0ken"] * 2


def test_a_server_of_another_kind_is_named_as_such():
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="<html>File not found</html>")

    with pytest.raises(RemoteError, match="http://other.test: not a capeen service"):
        Server("http://other.test", transport=httpx.MockTransport(handle))


def test_a_stopped_job_gives_up_its_retries_at_once():
    server, _ = mock_server([httpx.Response(503, headers={"Retry-After": "30"}, json={})] * 10, record_waits=False)
    failure: list[BaseException] = []

    def caption() -> None:
        try:
            server.caption([("a.png", b"png")], {})
        except RemoteError as exc:
            failure.append(exc)

    thread = threading.Thread(target=caption)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    server.stop()
    thread.join(5)
    assert time.monotonic() - started < 2
    assert "the job stopped" in str(failure[0])


def test_captioning_through_a_server_does_not_load_torch():
    # a script that captions through the service starts in a fraction of a second: no torch, no web framework
    code = ("import sys; from capeen.cli import main; "
            f"rc = main(['caption', 'x.png', '--server', 'http://127.0.0.1:{free_port()}', '--retries', '0']); "
            "print(rc, sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "2 []", result.stderr
    assert "Connection refused" in result.stderr


def test_an_uncalibrated_servers_fixed_mode_is_refused_before_any_upload(capsys, tiny_checkpoint, folder):
    """Without a threshold to default to, every request of the default mode would get a 422: one line instead."""
    import dataclasses

    from models.checkpoint import Thresholds, load_checkpoint
    from models.engine import CaptionEngine

    uncalibrated = CaptionEngine(dataclasses.replace(load_checkpoint(tiny_checkpoint), thresholds=Thresholds()))
    with running_server(Settings(log_level="warning"), uncalibrated) as server:
        rc, out, err = run(capsys, "caption", folder / "img-01.png", "--server", server.url)
        assert rc == 2 and out == ""
        assert_one_line_error(err, "has no calibrated threshold: give --threshold T, or --mode adaptive or full")
        for options in (["--mode", "full"], ["--threshold", "0.5"]):
            rc, out, _ = run(capsys, "caption", folder / "img-01.png", "--server", server.url, "--json", *options)
            assert rc == 0 and [set(line) >= {"caption", "exit_layers"} for line in json.loads(out)] == [True]
