"""`capeen caption --server URL`: the same captions, lines and exit status as a local run, through a real
uvicorn server; back-pressure waited out; the retry rules of `service.client.Server` on a mock transport."""

from __future__ import annotations

import json
import socket
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
    (["--concurrency", "4"], ["--concurrency: only with --server URL"]),
    (["--header", "Authorization: Bearer x"], ["--header: only with --server URL"]),
    (["--mode", "adaptive"], ["--mode adaptive: only with --server URL"]),
    (["--server", "{server}", "--header", "no colon"], ["--header 'no colon'", "Name: value"]),
    (["--server", "{server}", "--concurrency", "0"], ["--concurrency must be at least 1"]),
    (["--server", "{server}", "--timeout", "nan"], ["--timeout must be a positive number"]),
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
    with running_server(settings, SlowEngine(tiny_engine, 0.05)) as going:
        stopper = threading.Timer(0.5, going.stop)  # as SIGTERM does: the requests in flight are answered
        stopper.start()
        rc, out, err = run(capsys, "caption", "--files-from", listed, "--server", going.url, "--jsonl",
                           "--batch-size", 1, "--concurrency", 1, "--retries", 1)
        stopper.join()
    assert rc == 2
    printed = [json.loads(line)["image"] for line in out.splitlines()]
    assert 0 < len(printed) < len(paths) and printed == [str(path) for path in paths[: len(printed)]]
    assert_one_line_error(err, "/caption/batch", "given up after 1 retry")


# ----- the retry rules, on a mock transport --------------------------------------------------------------------
MODEL = {"name": "m", "max_images_per_request": 4, "max_upload_bytes": 1000}
CAPTION = {"caption": "a red circle", "tokens": ["a", "red", "circle"], "exit_layers": [1, 2, 1],
           "mean_exit_layer": 1.5, "threshold": 0.7, "arm": None, "policy": None}


class Waits:
    """Stands in for the server's stop event: records each wait instead of sleeping it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def wait(self, seconds: float) -> bool:
        self.seconds.append(seconds)
        return False

    def set(self) -> None:
        pass


def mock_server(answers: list[httpx.Response], retries: int = 8, **kwargs) -> tuple[Server, list[httpx.Request]]:
    """A `Server` whose GET /v1/model is answered with MODEL and whose other requests get `answers` in turn."""
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=MODEL) if request.url.path == "/v1/model" else answers.pop(0)

    server = Server("http://capeen.test", retries=retries, transport=httpx.MockTransport(handle), **kwargs)
    server._stopped = Waits()
    return server, sent


def test_retry_after_is_honoured_and_other_failures_back_off():
    server, sent = mock_server([
        httpx.Response(503, headers={"Retry-After": "2"}, json={"error": "queue_full", "detail": "full"}),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(504, json={"error": "deadline", "detail": "late"}),
        httpx.Response(200, json={"results": [{"index": 0, "filename": "a.png", **CAPTION}]}),
    ])
    assert server.caption([("a.png", b"png")], {"mode": "fixed"})[0]["caption"] == "a red circle"
    assert server._stopped.seconds == [2.0, 1.0, 2.0]  # Retry-After, then the backoff doubling from 0.5 s
    assert [request.url.path for request in sent] == ["/v1/model"] + ["/caption/batch"] * 4


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
    server, _ = mock_server([httpx.Response(503, headers={"Retry-After": "30"}, json={})] * 10)
    server._stopped = threading.Event()
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
