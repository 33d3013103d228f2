"""The service under pressure and across its lifetime: an overfilled queue answers every request exactly once,
a vanished client does not stall the worker, readiness before start-up, graceful shutdown keeps the bandit
and a restart restores it, and `capeen serve` reports bad configuration in one line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.test_service import (
    SlowEngine,
    assert_error,
    encode,
    metric_value,
    noise_image,
    read_reply,
    running_server,
    tiny_engine_fixture,  # noqa: F401  (the tiny_engine fixture)
    upload,
)


def test_readyz_is_503_before_the_lifespan_has_run(tiny_checkpoint) -> None:
    app = create_app(Settings(checkpoint=tiny_checkpoint))  # no lifespan: nothing loaded or warmed

    async def probe() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return (await http.get("/healthz"), await http.get("/readyz"),
                    await http.post("/caption", files=upload(encode(noise_image(0)))))

    alive, ready, caption = asyncio.run(probe())
    assert alive.status_code == 200
    assert_error(ready, 503, "not_ready")
    assert ready.headers["retry-after"] == "1"
    assert_error(caption, 503, "not_ready")


def test_overfilled_queue_answers_every_request_exactly_once(tiny_engine) -> None:
    """One request decodes at a time (1 s each) and two may wait; 24 arrive at once with a 2 s deadline.

    The first one queued is answered after about 1 s, the third could be only after 3 s: so there are
    captions, refusals and timeouts, with a second of slack for a busy machine (CI's took 0.45 s once
    to queue the first upload of the burst)."""
    settings = Settings(max_batch_size=1, max_wait_ms=0, queue_size=2, request_timeout_s=2.0, log_level="warning")
    total = 24
    with running_server(settings, SlowEngine(tiny_engine, 1.0)) as server:
        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=total)
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as http:
                return await asyncio.gather(*(
                    http.post("/caption", files=upload(encode(noise_image(i))), data={"mode": "fixed"},
                              headers={"X-Request-ID": f"load-{i}"})
                    for i in range(total)))

        responses = asyncio.run(burst())
        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) <= {200, 503, 504}, statuses
        assert statuses[200] >= 1 and statuses[503] >= 1 and statuses[504] >= 1, statuses
        for i, response in enumerate(responses):
            assert response.headers["x-request-id"] == f"load-{i}"
            if response.status_code == 200:
                assert response.json()["request_id"] == f"load-{i}"
            elif response.status_code == 503:
                assert_error(response, 503, "queue_full")
                assert response.headers["retry-after"] == "1"
            else:
                assert_error(response, 504, "timeout")

        # The server answered each request once, and the worker is free again afterwards: a request that
        # timed out no longer counts as waiting, and is skipped when the worker comes to it.
        with httpx.Client(base_url=server.url, timeout=30) as http:
            text = http.get("/metrics").text
            answered = {code: metric_value(text, f'capeen_requests_total{{route="/caption",status="{code}"}}')
                        for code in (200, 503, 504)}
            assert answered == {code: float(statuses[code]) for code in (200, 503, 504)}
            deadline = time.monotonic() + 5
            while metric_value(http.get("/metrics").text, "capeen_queue_depth") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric_value(http.get("/metrics").text, "capeen_queue_depth") == 0
            assert http.post("/caption", files=upload(encode(noise_image(99)))).status_code == 200


def test_a_client_that_leaves_does_not_stall_the_worker(tiny_engine) -> None:
    """Four clients give up (after 0.15 s each) while the first of them is being decoded (0.8 s). A fifth then
    waits for the rest of that decode and its own (about 1 s), not for the three abandoned requests queued
    behind it (they would add 2.4 s)."""
    delay, abandoned = 0.8, 4
    settings = Settings(max_batch_size=1, queue_size=8, log_level="warning")
    with running_server(settings, SlowEngine(tiny_engine, delay)) as server:
        images = [encode(noise_image(i)) for i in range(abandoned)]
        with httpx.Client(base_url=server.url, timeout=0.15) as impatient:
            for data in images:  # each gives up long before its caption is ready
                with pytest.raises(httpx.TimeoutException):
                    impatient.post("/caption", files=upload(data))
        with httpx.Client(base_url=server.url, timeout=30) as http:
            started = time.monotonic()
            assert http.post("/caption", files=upload(encode(noise_image(7)))).status_code == 200
            assert time.monotonic() - started < 2 * delay + 0.6
            deadline = time.monotonic() + 5
            while (metric_value(http.get("/metrics").text, 'capeen_requests_total{route="/caption",status="499"}')
                   < abandoned):
                assert time.monotonic() < deadline, "the abandoned requests were not noticed"
                time.sleep(0.05)


class StartedEngine(SlowEngine):
    """A slow engine that says when its first batch has started."""

    def __init__(self, engine, delay: float) -> None:
        super().__init__(engine, delay)
        self.started = threading.Event()

    def caption_pixels(self, *args, **kwargs):
        self.started.set()
        return super().caption_pixels(*args, **kwargs)


def test_abandoned_requests_give_their_place_in_the_queue_back_at_once(tiny_engine) -> None:
    """Two requests wait behind a 3 s decode in a queue of two, and their clients give up. Before that decode
    ends, the queue-depth gauge reads 0 and two new requests are queued, not refused with queue_full."""
    settings = Settings(max_batch_size=1, queue_size=2, log_level="warning")
    engine = StartedEngine(tiny_engine, 3.0)
    with running_server(settings, engine) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        first: list[int] = []
        decoding = threading.Thread(target=lambda: first.append(
            http.post("/caption", files=upload(encode(noise_image(0)))).status_code))
        decoding.start()
        assert engine.started.wait(10), "the first request was not decoded"
        deadline = time.monotonic() + 10
        with httpx.Client(base_url=server.url, timeout=0.3) as impatient:
            for seed in (1, 2):
                with pytest.raises(httpx.TimeoutException):
                    impatient.post("/caption", files=upload(encode(noise_image(seed))))
        closed = 'capeen_requests_total{route="/caption",status="499"}'
        while metric_value(http.get("/metrics").text, closed) < 2:
            assert time.monotonic() < deadline, "the abandoned requests were not noticed"
            time.sleep(0.02)
        assert metric_value(http.get("/metrics").text, "capeen_queue_depth") == 0
        assert decoding.is_alive(), "the first decode ended too soon for this test to mean anything"

        async def two_more() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                return [r.status_code for r in await asyncio.gather(*(
                    client.post("/caption", files=upload(encode(noise_image(seed)))) for seed in (3, 4)))]

        assert asyncio.run(two_more()) == [200, 200]
        decoding.join(30)
        assert first == [200]


@pytest.mark.parametrize("slots", [1, 3])
def test_uploads_are_decoded_at_most_decode_concurrency_at_once(tiny_engine, monkeypatch, slots) -> None:
    """Eight uploads at once: at most CAPEEN_DECODE_CONCURRENCY are turned into pixels together (a large image
    holds hundreds of MB while it is), and every request still gets its caption."""
    import service.routes.caption as route

    decoding, most = 0, 0
    lock = threading.Lock()

    def slow_image_pixels(*args):
        nonlocal decoding, most
        with lock:
            decoding += 1
            most = max(most, decoding)
        time.sleep(0.2)
        with lock:
            decoding -= 1
        return route_image_pixels(*args)

    route_image_pixels = route.image_pixels
    monkeypatch.setattr(route, "image_pixels", slow_image_pixels)
    settings = Settings(decode_concurrency=slots, log_level="warning")
    with running_server(settings, tiny_engine) as server:
        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                return [r.status_code for r in await asyncio.gather(*(
                    http.post("/caption", files=upload(encode(noise_image(seed)))) for seed in range(8)))]

        assert asyncio.run(burst()) == [200] * 8
    assert most == slots


@pytest.mark.parametrize("path", ["/caption", "/caption/batch"])
def test_a_request_waiting_for_a_decode_slot_gets_504_at_its_deadline(tiny_engine, monkeypatch, path) -> None:
    """A decode cannot be stopped once it runs: an image that takes long (a slow or hostile one) holds its slot
    however long it takes. The requests behind it must get their 504 at their own deadline, not when it ends."""
    import service.routes.caption as route

    route_image_pixels = route.image_pixels
    slow_started = threading.Event()

    def image_pixels(*args):
        if not slow_started.is_set():
            slow_started.set()
            time.sleep(4.0)
        return route_image_pixels(*args)

    monkeypatch.setattr(route, "image_pixels", image_pixels)
    settings = Settings(decode_concurrency=1, request_timeout_s=1.0, log_level="warning")
    with running_server(settings, tiny_engine) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        slow = threading.Thread(target=http.post, args=("/caption",), kwargs={"files": upload(encode(noise_image(0)))})
        slow.start()
        assert slow_started.wait(10)
        started = time.monotonic()
        image = upload(encode(noise_image(1)))
        reply = http.post(path, files=image if path == "/caption" else [*image.items()] * 2)
        waited = time.monotonic() - started
        slow.join(30)
        assert_error(reply, 504, "timeout")
        assert "waited for its turn to be decoded" in reply.json()["detail"]
        assert waited < 3.0, f"answered after {waited:.1f} s, when the slow decode ended, not at the deadline"
        # and the slot is free again once the slow decode is done
        assert http.post("/caption", files=upload(encode(noise_image(2)))).status_code == 200


def test_a_client_gone_while_its_image_was_decoded_costs_no_engine_time(tiny_engine, monkeypatch) -> None:
    import service.routes.caption as route

    route_image_pixels = route.image_pixels
    monkeypatch.setattr(route, "image_pixels", lambda *args: (time.sleep(0.5), route_image_pixels(*args))[1])
    with running_server(Settings(log_level="warning"), tiny_engine) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        with pytest.raises(httpx.TimeoutException):
            http.post("/caption", files=upload(encode(noise_image(1))), timeout=0.2)
        closed = 'capeen_requests_total{route="/caption",status="499"}'
        deadline = time.monotonic() + 10
        while metric_value(http.get("/metrics").text, closed) < 1:
            assert time.monotonic() < deadline, "the request that was left was not answered"
            time.sleep(0.05)
        metrics = http.get("/metrics").text
        assert metric_value(metrics, "capeen_batch_size_count") == 0  # never decoded
        assert metric_value(metrics, "capeen_tokens_generated_total") == 0
        assert http.get("/v1/bandit").json()["rounds"] == 0  # and the bandit learnt nothing from it


def test_a_failure_to_learn_from_a_caption_does_not_cost_the_caption(tiny_engine, monkeypatch) -> None:
    def broken_record(*args) -> None:
        raise RuntimeError("a bug in the metrics or the bandit")

    monkeypatch.setattr("service.runtime._record", broken_record)
    with running_server(Settings(log_level="critical"), tiny_engine) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        for mode in ("adaptive", "fixed", "full"):
            assert http.post("/caption", files=upload(encode(noise_image(1))), data={"mode": mode}).status_code == 200


def test_an_upload_that_stalls_gets_408_at_its_deadline(tiny_engine) -> None:
    """Half a body, then nothing: the connection is answered at the request's deadline, not held forever."""
    with running_server(Settings(request_timeout_s=1.0, log_level="warning"), tiny_engine) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=15) as conn:
            started = time.monotonic()
            conn.sendall(b"POST /caption HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
                         b"filename=\"a.png\"\r\n\r\n" + encode(noise_image(0))[:100])
            reply = read_reply(conn)
            waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"upload_timeout"' in reply and 0.8 < waited < 10
        with httpx.Client(base_url=server.url, timeout=30) as http:  # and the server goes on
            assert http.post("/caption", files=upload(encode(noise_image(1)))).status_code == 200


def test_a_lone_request_does_not_wait_for_company(tiny_engine) -> None:
    """A batch waits up to max_wait_ms only for requests already being decoded; with none, it leaves at once."""
    settings = Settings(max_wait_ms=3000, log_level="warning")
    with running_server(settings, tiny_engine) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        started = time.monotonic()
        assert http.post("/caption", files=upload(encode(noise_image(1)))).status_code == 200
        assert time.monotonic() - started < 2.0  # 3 s if it had waited for company


class FailingOnce:
    """An engine whose next batch raises, as a GPU out of memory would."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.fail = True

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def caption_pixels(self, *args, **kwargs):
        if self.fail:
            self.fail = False
            raise RuntimeError("out of memory")
        return self._engine.caption_pixels(*args, **kwargs)


def test_a_failing_batch_is_a_500_and_the_worker_goes_on(tiny_engine) -> None:
    settings = Settings(log_level="warning")
    with running_server(settings, FailingOnce(tiny_engine)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        failed = http.post("/caption", files=upload(encode(noise_image(1))))
        assert_error(failed, 500, "engine_failed")
        assert "out of memory" in failed.json()["detail"]
        assert http.post("/caption", files=upload(encode(noise_image(1)))).status_code == 200


def _rounds_on_disk(path, timeout_s: float = 10.0, at_least: int = 0) -> int:
    """The rounds in the snapshot at `path`, once it exists and holds at least `at_least`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if path.exists():
            rounds = json.loads(path.read_text())["state"]["rounds"]
            if rounds >= at_least:
                return rounds
        assert time.monotonic() < deadline, f"no snapshot with {at_least} rounds at {path}"
        time.sleep(0.05)


def test_the_bandit_is_saved_while_running_and_right_after_a_reset(tiny_engine, tmp_path) -> None:
    """A crash or a SIGKILL must not lose everything learnt since the start, nor bring back a reset state."""
    state = tmp_path / "bandit.json"
    settings = Settings(bandit_state=state, bandit_save_interval_s=0.2, log_level="warning")
    with running_server(settings, tiny_engine) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        for seed in range(3):
            assert http.post("/caption", files=upload(encode(noise_image(seed)))).status_code == 200
        assert _rounds_on_disk(state, at_least=3) == 3  # written by the running service, not at its stop
        assert http.post("/v1/bandit/reset").status_code == 200
        assert json.loads(state.read_text())["state"]["rounds"] == 0  # at once, before the next periodic save
        written = state.stat().st_mtime_ns
        time.sleep(0.6)
        assert state.stat().st_mtime_ns == written  # nothing new learnt: not rewritten


def test_graceful_shutdown_drains_and_keeps_the_bandit(tiny_engine, tmp_path) -> None:
    state = tmp_path / "bandit.json"
    settings = Settings(bandit_state=state, max_batch_size=1, log_level="warning")
    results: list[int] = []

    def ask(url: str, seed: int) -> None:
        results.append(httpx.post(f"{url}/caption", files=upload(encode(noise_image(seed))), timeout=30).status_code)

    with running_server(settings, SlowEngine(tiny_engine, 0.5)) as server:
        senders = [threading.Thread(target=ask, args=(server.url, seed)) for seed in range(3)]
        for sender in senders:
            sender.start()
        batcher = server.app.state.runtime.batcher
        deadline = time.monotonic() + 10
        while batcher.depth() < 2:  # all three are in: one decoding, two queued
            assert time.monotonic() < deadline, "the requests did not arrive"
            time.sleep(0.01)
        server.stop()  # as on SIGTERM: the queued requests are still answered
        for sender in senders:
            sender.join(30)
    assert results == [200, 200, 200]
    snapshot = json.loads(state.read_text())
    assert snapshot["state"]["rounds"] == 3 and snapshot["policy"] == "cd-ucb"

    with running_server(settings, tiny_engine) as restarted:
        bandit = httpx.get(f"{restarted.url}/v1/bandit").json()
    assert bandit["rounds"] == 3 and sum(arm["pulls"] for arm in bandit["arms"]) == 3


class HangsAfterFirstBatch:
    """An engine that answers one batch, then hangs (a stuck GPU) until `release` is set."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.release = threading.Event()
        self.batches = 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def caption_pixels(self, *args, **kwargs):
        self.batches += 1
        if self.batches > 1:
            self.release.wait(120)
        return self._engine.caption_pixels(*args, **kwargs)


def test_a_hung_engine_neither_blocks_shutdown_nor_loses_the_bandit(tiny_engine, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("service.runtime.DRAIN_TIMEOUT_S", 1.0)
    state = tmp_path / "bandit.json"
    engine = HangsAfterFirstBatch(tiny_engine)
    settings = Settings(bandit_state=state, request_timeout_s=1.0, log_level="warning")
    try:
        with running_server(settings, engine) as server:
            assert httpx.post(f"{server.url}/caption", files=upload(encode(noise_image(1))),
                              timeout=30).status_code == 200
            assert_error(httpx.post(f"{server.url}/caption", files=upload(encode(noise_image(2))), timeout=30),
                         504, "timeout")
            started = time.monotonic()
            server.stop()  # asserts that the server did stop
            assert time.monotonic() - started < 20
        assert json.loads(state.read_text())["state"]["rounds"] == 1  # what it learnt is kept
    finally:
        engine.release.set()


def test_an_engine_stuck_in_its_thread_does_not_keep_python_from_exiting() -> None:
    """After the drain gives up on an in-process engine, the process must still exit (a ThreadPoolExecutor's
    thread is joined at exit, forever)."""
    script = ("import threading\n"
              "from service.batcher import EngineThread\n"
              "engine = EngineThread('capeen-engine-0')\n"
              "assert engine.submit(sum, [1, 2]).result() == 3\n"
              "engine.submit(threading.Event().wait)  # a batch that never ends\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr


class TimedEngine(SlowEngine):
    """A slow engine that notes when each of its calls started and ended."""

    def __init__(self, engine, delay: float) -> None:
        super().__init__(engine, delay)
        self.calls: list[tuple[float, float]] = []

    def caption_pixels(self, *args, **kwargs):
        started = time.monotonic()
        try:
            return super().caption_pixels(*args, **kwargs)
        finally:
            self.calls.append((started, time.monotonic()))


def test_two_engines_decode_side_by_side_and_both_drain_at_shutdown(tiny_engine) -> None:
    """Batches go to whichever engine is free, so two run at once; at shutdown every queued request is still
    answered, each with its own caption, and each engine's calls are counted under its own label."""
    from prometheus_client import generate_latest

    from models.images import load_image

    settings = Settings(max_batch_size=1, log_level="warning")
    engines = [TimedEngine(tiny_engine, 0.4), TimedEngine(tiny_engine, 0.4)]
    images = [encode(noise_image(seed)) for seed in range(6)]
    answers: dict[int, httpx.Response] = {}

    def ask(url: str, index: int) -> None:
        answers[index] = httpx.post(f"{url}/caption", files=upload(images[index]), data={"mode": "full"},
                                    timeout=30)

    with running_server(settings, *engines) as server:
        assert httpx.get(f"{server.url}/v1/model").json()["engines"] == 2
        senders = [threading.Thread(target=ask, args=(server.url, index)) for index in range(len(images))]
        for sender in senders:
            sender.start()
        batcher = server.app.state.runtime.batcher
        deadline = time.monotonic() + 10
        while batcher.depth() < 3:  # two decoding, the rest queued
            assert time.monotonic() < deadline, "the requests did not arrive"
            time.sleep(0.01)
        server.stop()  # as on SIGTERM: the queued requests are still answered, by both engines
        for sender in senders:
            sender.join(30)
    for index, image in enumerate(images):
        alone = tiny_engine.caption([load_image(image)]).results[0]
        assert answers[index].status_code == 200 and answers[index].json()["caption"] == alone.caption
    first, second = (engine.calls for engine in engines)
    assert first and second and len(first) + len(second) == len(images)
    assert any(a_start < b_end and b_start < a_end for a_start, a_end in first for b_start, b_end in second)
    metrics = generate_latest(server.app.state.registry).decode()
    for engine, calls in enumerate((first, second)):
        assert metric_value(metrics, f'capeen_batch_duration_seconds_count{{engine="{engine}"}}') == len(calls)
    assert 'engines="2"' in metrics  # capeen_model_info


def test_kv_fill_setting_decodes_the_deferred_way(tiny_checkpoint) -> None:
    from models.engine import CaptionEngine
    from models.images import load_image

    images = [encode(noise_image(seed)) for seed in range(6)]
    settings = Settings(checkpoint=tiny_checkpoint, kv_fill="deferred", max_wait_ms=200, log_level="warning")
    bodies: dict[int, dict] = {}

    def ask(url: str, k: int) -> None:
        bodies[k] = httpx.post(f"{url}/caption", files=upload(images[k]),
                               data={"mode": "fixed", "threshold": "0.5"}, timeout=30).json()

    with running_server(settings) as server:
        assert httpx.get(f"{server.url}/v1/model").json()["kv_fill"] == "deferred"
        senders = [threading.Thread(target=ask, args=(server.url, k)) for k in range(6)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
    engine = CaptionEngine.from_checkpoint(tiny_checkpoint, device="cpu", kv_fill="deferred")
    for k, image in enumerate(images):  # decoded in batches with the others, each as it would be alone
        alone = engine.caption([load_image(image)], 0.5).results[0]
        assert (bodies[k]["caption"], bodies[k]["exit_layers"]) == (alone.caption, alone.exit_layers)


def _serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    capeen = Path(sys.executable).with_name("capeen")  # the console script (`python -m capeen.cli` would
    # load capeen.cli twice, as __main__ too, and its UserError would not be the one service.cli raises)
    return subprocess.run([str(capeen), "serve", *args], capture_output=True, text=True, timeout=120, env=environment)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--checkpoint", "/no/such/checkpoint", "--device", "cpu"), {}, "/no/such/checkpoint"),
        ((), {"CAPEEN_PORT": "eighty"}, "CAPEEN_PORT"),
        ((), {"CAPEEN_CHECKPOINT": ""}, "CAPEEN_CHECKPOINT: empty: give a checkpoint directory"),
        (("--port", "99999"), {}, "bad setting: --port: Input should be less than or equal to 65535"),
        ((), {"CAPEEN_POLICY": "greedy"}, "CAPEEN_POLICY"),
        ((), {"CAPEEN_BANDIT_THRESHOLDS": "0.3,high"}, "CAPEEN_BANDIT_THRESHOLDS"),
        ((), {"CAPEEN_KV_FILL": "exact"}, "CAPEEN_KV_FILL"),
        ((), {"CAPEEN_ENGINES": "0"}, "CAPEEN_ENGINES"),
        ((), {"CAPEEN_ENGINES": "2", "CAPEEN_ENGINE_PROCESS": "false"}, "CAPEEN_ENGINES above 1 needs"),
        ((), {"CAPEEN_ONEDNN": "sometimes"}, "CAPEEN_ONEDNN"),
        ((), {"CAPEEN_REQUEST_TIMEOUT_S": "inf"}, "CAPEEN_REQUEST_TIMEOUT_S"),
        ((), {"CAPEEN_BANDIT_MU": "nan"}, "CAPEEN_BANDIT_MU"),
        ((), {"CAPEEN_BANDIT_STATE": "/no/such/folder/bandit.json"}, "folder /no/such/folder does not exist"),
        ((), {"CAPEEN_BANDIT_STATE": "/tmp"}, "is a directory"),
        ((), {"CAPEEN_BANDIT_STATE": ""}, "CAPEEN_BANDIT_STATE: empty: give the snapshot's file path"),
        ((), {"CAPEEN_BANDIT_STATE": "/tmp/" + "b" * 300 + ".json"}, "File name too long"),
        # root may write anywhere by os.access's word, but not there: the check creates a file
        ((), {"CAPEEN_BANDIT_STATE": "/proc/bandit.json"}, "so the snapshot could not be written"),
        ((), {"CAPEEN_ADMIN_TOKEN": " "}, "CAPEEN_ADMIN_TOKEN: is set but empty"),
        ((), {"CAPEEN_ADMIN_TOKEN": " change-me"}, "CAPEEN_ADMIN_TOKEN: may hold only ASCII letters"),
        ((), {"CAPEEN_ADMIN_TOKEN": "pässwörd"}, "CAPEEN_ADMIN_TOKEN: may hold only ASCII letters"),
    ],
    ids=["bad-checkpoint", "bad-port", "empty-checkpoint", "bad-port-flag", "bad-policy", "bad-grid", "bad-kv-fill", "no-engine", "engines-in-process",
         "bad-onednn", "infinite-timeout", "nan-price", "state-in-missing-folder", "state-is-a-folder",
         "empty-state-path", "state-name-too-long", "state-in-unwritable-folder", "blank-admin-token",
         "admin-token-with-spaces", "admin-token-not-ascii"],
)
def test_serve_reports_bad_configuration_in_one_line(args, env, says) -> None:
    done = _serve(*args, **env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("capeen serve: error:"), done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this host has CUDA")
@pytest.mark.parametrize("engine_process", ["true", "false"])
def test_serve_on_cuda_without_cuda_says_so_in_one_line(tiny_checkpoint, engine_process) -> None:
    done = _serve("--checkpoint", str(tiny_checkpoint), "--device", "cuda", CAPEEN_ENGINE_PROCESS=engine_process)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "CUDA was asked for but is not available on this machine" in done.stderr


def test_an_admin_token_may_be_a_passphrase_with_inner_spaces(tiny_engine) -> None:
    passphrase = "correct horse battery staple"
    with running_server(Settings(admin_token=passphrase, log_level="warning"), tiny_engine) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v1/bandit/reset", headers={"Authorization": f"Bearer {passphrase}"}).status_code == 200
        assert http.post("/v1/bandit/reset", headers={"Authorization": "Bearer correct horse"}).status_code == 403


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_answers_probes_while_the_model_loads_and_drops_nothing_at_the_hand_over(tiny_checkpoint) -> None:
    """`capeen serve` loads the model before uvicorn starts: meanwhile /healthz is 200 and the rest 503 not_ready,
    as the app answers before it is ready, and the port passes to uvicorn without refusing a connection."""
    port = _free_port()
    capeen = Path(sys.executable).with_name("capeen")
    server = subprocess.Popen([str(capeen), "serve", "--port", str(port), "--checkpoint", str(tiny_checkpoint)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "CAPEEN_LOG_LEVEL": "warning"})
    answers: list[tuple[int, int, str | None, dict]] = []
    failures_after_the_first_answer: list[str] = []
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            while time.monotonic() < deadline:
                try:
                    ready, alive = http.get("/readyz"), http.get("/healthz")
                except httpx.TransportError as exc:
                    if answers:
                        failures_after_the_first_answer.append(repr(exc))
                    assert server.poll() is None, server.stderr.read()
                    time.sleep(0.01)
                    continue
                answers.append((ready.status_code, alive.status_code, ready.headers.get("retry-after"), ready.json()))
                if ready.status_code == 200:
                    break
            assert http.post("/caption", files=upload(encode(noise_image(0)))).status_code == 200
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=60)
    assert answers and answers[-1][:2] == (200, 200), answers[-3:]
    loading = answers[:-1]
    assert loading, "the first answer came from the ready service: the load was not observed"
    assert all(answer == (503, 200, "1", {"error": "not_ready", "detail": "the model is still loading"})
               for answer in loading), loading[:3]
    assert failures_after_the_first_answer == []
    assert server.returncode == 0 and "Traceback" not in stderr, stderr


def _engine_processes_of(checkpoint: Path) -> list[int]:
    """Engine processes started for `checkpoint`, from anyone's command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            if "service.engine_process" in command and str(checkpoint) in command:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("engines", [1, 2])
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_stopped_while_the_engines_load_it_says_so_in_one_line_and_leaves_no_engine_behind(
        tiny_checkpoint, tmp_path, engines, stop) -> None:
    """The engines start loading before the service has imported torch. Ctrl-C on the terminal (the whole
    process group) or SIGTERM to the service (`timeout`, a supervisor) meanwhile is one line, with no engine's
    traceback, and ends every engine at once rather than when it has loaded the model."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    port = _free_port()
    capeen = Path(sys.executable).with_name("capeen")
    server = subprocess.Popen([str(capeen), "serve", "--port", str(port), "--checkpoint", str(checkpoint),
                               "--engines", str(engines)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "CAPEEN_LOG_LEVEL": "warning"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 60
            while True:  # the service answers probes once its engines are on their way
                assert server.poll() is None and time.monotonic() < deadline, "capeen serve did not answer"
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/readyz").status_code == 503:
                        break
                time.sleep(0.01)
        assert len(_engine_processes_of(checkpoint)) == engines
        if stop == "ctrl-c":
            os.killpg(server.pid, signal.SIGINT)
        else:
            server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    said = "interrupted" if stop == "ctrl-c" else "terminated"
    assert server.returncode == (130 if stop == "ctrl-c" else 143) and stderr == f"capeen serve: {said}\n", stderr
    assert _engine_processes_of(checkpoint) == []


ACCESS_LINES = {
    "probe": re.compile(r'"GET /(healthz|readyz) HTTP/1.1" 200'),
    "scrape": re.compile(r'"GET /metrics(\?[^ ]*)? HTTP/1.1" 200'),
    "caption": re.compile(r'"POST /caption HTTP/1.1" 200'),
    "refusal": re.compile(r'"GET /nope HTTP/1.1" 404'),
    "failed probe": re.compile(r'"POST /readyz HTTP/1.1" 405'),
}


@pytest.mark.parametrize(("mode", "expected"), [
    (None, {"caption", "refusal", "failed probe"}),  # the default, "requests"
    ("all", set(ACCESS_LINES)),
    ("off", set()),
])
def test_serve_access_log_leaves_out_routine_probes_and_scrapes(tiny_checkpoint, mode, expected) -> None:
    """Health checks and Prometheus ask every few seconds; by default their successful requests write no access
    line, while every caption and every refusal (a probe's included) still does."""
    port = _free_port()
    capeen = Path(sys.executable).with_name("capeen")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CAPEEN_LOG_LEVEL": "info"}
    if mode is not None:
        environment["CAPEEN_ACCESS_LOG"] = mode
    server = subprocess.Popen([str(capeen), "serve", "--port", str(port), "--checkpoint", str(tiny_checkpoint)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None and time.monotonic() < deadline, "capeen serve did not get ready"
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            assert http.get("/healthz").status_code == 200
            assert http.get("/metrics").status_code == http.get("/metrics?name[]=up").status_code == 200
            assert http.post("/caption", files=upload(encode(noise_image(0)))).status_code == 200
            assert http.get("/nope").status_code == 404
            assert http.post("/readyz").status_code == 405
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert "serving on http://" in output  # the service's own log is not affected
    written = {kind for kind, line in ACCESS_LINES.items() if line.search(output)}
    assert written == expected, output


def test_the_loading_responder_answers_drains_uploads_times_out_idle_clients_and_hands_over_its_backlog(
        monkeypatch) -> None:
    from service.cli import _listening_sockets
    from service.loading import _Handler, answering_while_loading

    monkeypatch.setattr(_Handler, "timeout", 0.5)
    [listener] = _listening_sockets("127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with answering_while_loading([listener]), httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            upload_while_loading = http.post("/caption", files=upload(b"\0" * (2 << 20)))  # read, then answered
            assert_error(upload_while_loading, 503, "not_ready")
            assert upload_while_loading.headers["retry-after"] == "1"
            with socket.create_connection(listener.getsockname(), timeout=10) as idle:
                assert idle.recv(1) == b""  # closed by the responder once its timeout passed, not held forever
        # after the block, a connection waits in the backlog for whoever serves next (uvicorn)
        with socket.create_connection(listener.getsockname(), timeout=10) as waiting:
            accepted, _ = listener.accept()
            accepted.close()
            assert waiting.recv(1) == b""
    finally:
        listener.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_serve_listens_on_every_address_of_its_host_and_ipv6_only_on_ipv6() -> None:
    from service.cli import _listening_sockets

    try:
        listeners = _listening_sockets("::1", 0)
    except Exception:  # noqa: BLE001 (a host without an IPv6 loopback)
        pytest.skip("no ::1 here")
    try:
        assert [s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) for s in listeners] == [1]
    finally:
        for listener in listeners:
            listener.close()


def test_serve_reports_a_port_in_use_in_one_line_before_loading_the_model() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = _serve("--port", str(port), "--checkpoint", "/no/such/checkpoint")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("capeen serve: error: cannot listen on 127.0.0.1:") and done.stderr.count("\n") == 1
    assert "in use" in done.stderr and time.monotonic() - started < 60


def test_load_benchmark_runs(tiny_checkpoint, capsys) -> None:
    """A seconds-long run of the load benchmark (BENCHMARKS.md has the 5-minute one with the shipped model)."""
    from service.loadtest import main

    assert main(["--checkpoint", str(tiny_checkpoint), "--concurrency", "1,4", "--requests", "24", "--images", "8",
                 "--image-size", "48", "--overload-s", "1", "--soak-s", "1"]) == 0
    table = capsys.readouterr().out
    for row in ("| dynamic batching (max 16) | 1 |", "| dynamic batching (max 16) | 4 |",
                "| batch-1 (max_batch_size=1) | 4 |", "| 2x saturation |", "| concurrency 4 |",
                "| the service's process |", "| the engine process |"):
        assert row in table, table
    # every closed-loop request answered 200, and the comparison's alternating rounds add up to --requests
    assert table.count("| 24 | 0 |") == 3
    assert re.search(r"\(4 alternating rounds: (\d+\.\d\dx, ){3}\d+\.\d\dx\)", table), table
    # the engine's share of the wall time and its time per image, read from the server's own metrics
    engine = re.findall(r"\| 24 \| 0 \| [\d.]+ \| [\d.]+ \| (\d+)% \| ([\d.]+) \|", table)
    assert len(engine) == 3 and all(int(busy) > 0 and float(ms) > 0 for busy, ms in engine), table


def test_setting_comparison_runs(tiny_checkpoint, capsys) -> None:
    from service.loadtest import main

    assert main(["--checkpoint", str(tiny_checkpoint), "--compare", "CAPEEN_ENGINE_PROCESS=false", "--concurrency",
                 "1,4", "--requests", "16", "--rounds", "2", "--images", "8", "--image-size", "48",
                 "--overload-s", "1"]) == 0
    table = capsys.readouterr().out
    for server in ("as configured", "CAPEEN_ENGINE_PROCESS=false"):
        for concurrency in (1, 4):  # every request answered, in two rounds of 8
            assert re.search(rf"\| {server} \| {concurrency} \| 16 \| 0 \| [\d.]+ \| [\d.]+, [\d.]+ \| [\d.]+ \|",
                             table), table
        overload = re.search(rf"\| {server} \| [\d.]+/s \| [\d.]+/s \| \d+ \| (\d+) \| [\d.]+ \| \d+ \| \d+ "
                             rf"\| (\d+) \| (\d+) \|", table)
        assert overload and int(overload[1]) > 0 and overload[2] == overload[3] == "0", table


def test_route_comparison_runs(tiny_checkpoint, capsys) -> None:
    """The same 16 images one per POST /caption and 4 per POST /caption/batch: each stream captions all 16 (the
    batch stream in 4 requests), in two rounds, and the batch route's captions are counted image by image."""
    from service.loadtest import main

    assert main(["--checkpoint", str(tiny_checkpoint), "--images-per-request", "4", "--concurrency", "1,2",
                 "--requests", "16", "--rounds", "2", "--images", "6", "--image-size", "48"]) == 0
    table = capsys.readouterr().out
    for concurrency in (1, 2):
        for route, requests in (("`POST /caption`, 1 image", 16), ("`POST /caption/batch`, 4 images", 4)):
            row = re.search(rf"\| {re.escape(route)} \| {concurrency} \| {requests} \| 0 \| ([\d.]+) \| "
                            rf"([\d.]+), ([\d.]+) \| ([\d.]+) \|", table)
            assert row and all(float(value) > 0 for value in row.groups()), table
        assert re.search(rf"- concurrency {concurrency}: `POST /caption/batch` captioned \*\*\d+\.\d\dx\*\*",
                         table), table


@pytest.mark.parametrize(("args", "says"), [(("--images-per-request", "1"), "must be at least 2"),
                                            (("--images-per-request", "4", "--compare", "CAPEEN_ENGINES=2"),
                                             "give one")])
def test_route_comparison_refuses_bad_options_in_one_line(args, says, capsys) -> None:
    from service.loadtest import main

    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize(("setting", "says"), [("MAX_WAIT_MS=0", "CAPEEN_SETTING=VALUE"),
                                               ("CAPEEN_NO_SUCH=1", "CAPEEN_SETTING=VALUE"),
                                               ("CAPEEN_MAX_WAIT_MS", "CAPEEN_SETTING=VALUE"),
                                               ("CAPEEN_MAX_WAIT_MS=-1", "--compare CAPEEN_MAX_WAIT_MS=-1:")])
def test_setting_comparison_refuses_a_bad_setting_in_one_line(setting, says, capsys) -> None:
    from service.loadtest import main

    assert main(["--compare", setting]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize(("args", "says"), [(("--rounds", "0"), "must be positive"),
                                            (("--rounds", "30", "--requests", "24"), "--rounds 30 is more than"),
                                            (("--image-size", "5"), "--image-size must be at least 32")])
def test_load_benchmark_refuses_bad_rounds_in_one_line(args, says, capsys) -> None:
    from service.loadtest import main

    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_load_client_does_not_reuse_connections_the_server_may_be_closing() -> None:
    """The load generator reuses a kept-alive connection only while it is younger than the server's idle
    timeout: writing a request as the server closes the connection gets it reset, unanswered, which the
    overload table would count as a request the service did not answer."""
    from service.loadtest import Connections

    async def scenario() -> tuple[int, int, list[int]]:
        accepted = 0

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()  # the client closed this connection

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Connections(port)
        statuses = [(await client.send(client.get("/")))[0], (await client.send(client.get("/")))[0]]
        kept = accepted  # the second request went over the first connection
        client.KEEPALIVE_EXPIRY_S = 0.0  # from now on every idle connection counts as expired
        statuses.append((await client.send(client.get("/")))[0])
        client.close()
        server.close()
        return kept, accepted, statuses

    kept, accepted, statuses = asyncio.run(scenario())
    assert statuses == [200, 200, 200]
    assert kept == 1 and accepted == 2


@pytest.mark.parametrize(("wait_fill", "expected"), [(0.5, 4), (1.0, 6)])
def test_a_half_full_batch_does_not_wait_for_requests_on_their_way(wait_fill, expected) -> None:
    """Four requests queued, two more being uploaded: at wait_fill 0.5 of 8 the batch of four leaves at once
    (the engine decodes it while the others gather); at 1.0 it waits for the two, up to max_wait_s."""
    from service.batcher import Batcher, Job

    async def scenario() -> int:
        batcher = Batcher(engines=(), metrics=None, on_decoded=lambda job, result: None, max_batch_size=8,
                          max_wait_s=0.5, queue_size=16, wait_fill=wait_fill)
        loop = asyncio.get_running_loop()

        def job() -> Job:
            return Job(pixels=None, threshold=0.5, max_tokens=4, arm=None, future=loop.create_future())

        for _ in range(4):
            batcher._queue.put_nowait(job())

        async def upload_then_queue() -> None:  # two uploads still being read when the batch forms
            with batcher.incoming():
                await asyncio.sleep(0.1)
                batcher._queue.put_nowait(job())

        uploads = [asyncio.ensure_future(upload_then_queue()) for _ in range(2)]
        await asyncio.sleep(0)  # the uploads have begun
        batch, stop = await batcher._collect(loop)
        await asyncio.gather(*uploads)
        assert not stop
        return len(batch)

    assert asyncio.run(scenario()) == expected


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("::", False), ("no-such-host.invalid", False)])
def test_serve_knows_when_its_address_reaches_beyond_this_machine(host, loopback) -> None:
    """Beyond loopback without CAPEEN_ADMIN_TOKEN, `capeen serve` warns that anyone can reset the bandit."""
    from service.cli import _loopback

    assert _loopback(host) is loopback


def test_every_setting_is_in_the_readmes_settings_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `") for line in readme.splitlines() if line.startswith("| `CAPEEN_")}
    assert {f"CAPEEN_{name.upper()}" for name in Settings.model_fields} <= rows


def test_readyz_and_captions_say_shutting_down_while_the_service_drains(tiny_engine) -> None:
    """Once shutdown has begun, a load balancer's probe and a late request both learn why they get 503."""
    app = create_app(Settings(log_level="warning"), [tiny_engine])

    async def scenario() -> tuple[httpx.Response, ...]:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                before = await http.get("/readyz")
                await app.state.runtime.batcher.close()
                return (before, await http.get("/readyz"),
                        await http.post("/caption", files=upload(encode(noise_image(0)))))

    before, ready, caption = asyncio.run(scenario())
    assert before.status_code == 200
    assert_error(ready, 503, "shutting_down")
    assert ready.headers["retry-after"] == "1"
    assert_error(caption, 503, "shutting_down")


def test_an_uncalibrated_checkpoint_is_said_at_start_and_fixed_mode_asks_for_a_threshold(tiny_checkpoint,
                                                                                         caplog) -> None:
    import dataclasses

    from models.checkpoint import Thresholds, load_checkpoint
    from models.engine import CaptionEngine

    uncalibrated = CaptionEngine(dataclasses.replace(load_checkpoint(tiny_checkpoint), thresholds=Thresholds()))
    app = create_app(Settings(log_level="warning"), [uncalibrated])

    async def scenario() -> tuple[httpx.Response, ...]:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                image = encode(noise_image(0))
                return tuple([await http.post("/caption", files=upload(image), data={"mode": mode})
                              for mode in ("fixed", "adaptive", "full")])

    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        fixed, adaptive, full = asyncio.run(scenario())
    warned = [record.getMessage() for record in caplog.records if "no calibrated threshold" in record.getMessage()]
    assert len(warned) == 1 and "capeen calibrate --checkpoint" in warned[0]
    assert fixed.status_code == 422 and "calibrate" in fixed.json()["detail"]
    assert adaptive.status_code == full.status_code == 200
