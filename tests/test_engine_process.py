"""The engine in a child process must caption exactly as the engine in the service's process, start with a
one-line reason when it cannot, survive the child's death and stop when told."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models.decoding import FULL_DEPTH
from models.engine import CaptionEngine
from service.engine_process import EngineOptions, EngineProcess, EngineProcessDied, EngineProcessHung, EngineStartError


def options(checkpoint) -> EngineOptions:
    return EngineOptions(checkpoint=str(checkpoint), device="cpu", half=False, kv_fill=None, torch_threads=1,
                         onednn=True, log_level="warning")


@pytest.fixture(scope="module")
def engine_process(tiny_checkpoint) -> Iterator[EngineProcess]:
    engine = EngineProcess(options(tiny_checkpoint))
    yield engine
    engine.close()


def scenes(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)) for i in range(count)]


def test_it_describes_and_captions_exactly_as_the_engine_in_process(engine_process, tiny_checkpoint):
    local = CaptionEngine.from_checkpoint(tiny_checkpoint, device="cpu")
    assert engine_process.alive and engine_process.pid != os.getpid()
    assert (engine_process.name, engine_process.config, engine_process.calibrated_threshold) == \
        (local.name, local.config, local.calibrated_threshold)
    assert (engine_process.exit_layers, engine_process.exit_offsets, engine_process.kv_fill) == \
        (local.exit_layers, local.exit_offsets, local.kv_fill)
    assert (engine_process.device.type, engine_process.dtype) == ("cpu", local.dtype)
    assert engine_process.threshold_for("fixed") == local.threshold_for("fixed")

    images = scenes(5)
    thresholds = [FULL_DEPTH, 0.3, 0.6, 0.9, 1.0]  # full depth crosses the pipe as JSON's Infinity
    remote = engine_process.caption_pixels(engine_process.pixels(images), thresholds, max_tokens=9)
    expected = local.caption(images, thresholds, max_tokens=9)
    for got, want in zip(remote.results, expected.results, strict=True):
        assert (got.caption, got.tokens, got.threshold) == (want.caption, want.tokens, want.threshold)
        assert got.trace == want.trace  # every token's exits and confidences: what the bandit learns from
    assert remote.timings.encode_s > 0 and remote.timings.decode_s > 0


def test_a_batch_that_fails_in_the_child_fails_alone(engine_process):
    pixels = engine_process.pixels(scenes(2))
    with pytest.raises(RuntimeError, match="thresholds"):
        engine_process.caption_pixels(pixels, [0.5, 0.5, 0.5])  # one threshold too many
    assert engine_process.alive
    assert len(engine_process.caption_pixels(pixels, 0.5).results) == 2


def test_floats_are_refused_before_they_reach_the_pipe(engine_process):
    with pytest.raises(TypeError, match="uint8"):
        engine_process.caption_pixels(engine_process.pixels(scenes(1)).float(), 0.5)


def test_a_checkpoint_that_cannot_load_fails_the_start_with_its_reason(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "config.json").unlink()
    with pytest.raises(EngineStartError, match="config.json"):
        EngineProcess(options(broken))


def test_a_dead_child_fails_the_batch_it_had_and_is_started_again(tiny_checkpoint, monkeypatch):
    engine = EngineProcess(options(tiny_checkpoint))
    try:
        pixels = engine.pixels(scenes(3))
        first_pid = engine.pid
        os.kill(first_pid, signal.SIGKILL)
        engine._process.wait(10)  # reaped: dead for sure
        # the child died after the service last looked: the batch sent to it fails with the reason...
        monkeypatch.setattr(EngineProcess, "alive", property(lambda self: True))
        with pytest.raises(EngineProcessDied, match="exit code -9"):
            engine.caption_pixels(pixels, 0.5)
        monkeypatch.undo()
        # ...and the next batch starts a new child and gets its captions
        assert len(engine.caption_pixels(pixels, 0.5).results) == 3
        assert engine.restarts == 1 and engine.pid != first_pid and engine.alive
    finally:
        engine.close()


@pytest.mark.parametrize("images", [2, 400], ids=["stuck-decoding", "stuck-reading-its-pixels"])
def test_a_hung_child_is_killed_and_started_again(tiny_checkpoint, images):
    """A stopped child never answers; with 400 images (1.2 MB) even sending it the pixels blocks."""
    engine = EngineProcess(options(tiny_checkpoint), batch_timeout_s=1.0)
    try:
        first_pid = engine.pid
        os.kill(first_pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(EngineProcessHung, match="within 1 s"):
            engine.caption_pixels(engine.pixels(scenes(images)), 0.5)
        assert time.monotonic() - started < 10  # one second, and the watchdog looks once a second
        assert len(engine.caption_pixels(engine.pixels(scenes(3)), 0.5).results) == 3
        assert engine.restarts == 1 and engine.pid != first_pid
    finally:
        engine.close()


def test_close_stops_the_child(tiny_checkpoint):
    engine = EngineProcess(options(tiny_checkpoint))
    process = engine._process
    engine.close()
    assert process.poll() == 0 and not engine.alive
    engine.close()  # twice is harmless


def test_the_service_captions_through_the_child_and_outlives_it(tiny_checkpoint):
    from service.settings import Settings
    from tests.test_service import encode, metric_value, noise_image, running_server, upload

    settings = Settings(checkpoint=tiny_checkpoint, engine_process=True, max_wait_ms=0, log_level="warning")
    with running_server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        engine = server.app.state.runtime.engine
        assert isinstance(engine, EngineProcess) and engine.alive
        first = client.post("/caption", files=upload(encode(noise_image(1))), data={"mode": "fixed"})
        assert first.status_code == 200, first.text
        os.kill(engine.pid, signal.SIGKILL)
        engine._process.wait(10)
        again = client.post("/caption", files=upload(encode(noise_image(1))), data={"mode": "fixed"})
        assert again.status_code == 200 and again.json()["caption"] == first.json()["caption"]
        assert metric_value(client.get("/metrics").text, "capeen_engine_restarts_total") == 1
        child = engine._process
    assert child.poll() == 0  # the service's shutdown stopped the child it had started


def test_the_service_starts_and_stops_several_engine_processes(tiny_checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    from service.settings import Settings
    from tests.test_service import encode, noise_image, running_server, upload

    settings = Settings(checkpoint=tiny_checkpoint, engines=2, max_batch_size=2, max_wait_ms=0, log_level="warning")
    images = [encode(noise_image(seed)) for seed in range(8)]
    with running_server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        engines = server.app.state.runtime.engines
        assert len(engines) == 2 and all(isinstance(e, EngineProcess) and e.alive for e in engines)
        assert len({engine.pid for engine in engines}) == 2 and client.get("/v1/model").json()["engines"] == 2
        assert [engine.options.index for engine in engines] == [0, 1]  # each picks its GPU by it
        assert client.get("/v1/model").json()["devices"] == ["cpu", "cpu"]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda image: client.post("/caption", files=upload(image),
                                                              data={"mode": "fixed"}), images))
        singles = [client.post("/caption", files=upload(image), data={"mode": "fixed"}) for image in images]
        assert [a.status_code for a in answers] == [200] * len(images)
        assert [a.json()["caption"] for a in answers] == [s.json()["caption"] for s in singles]
        children = [engine._process for engine in engines]
    assert [child.poll() for child in children] == [0, 0]  # shutdown stopped every child it had started


@pytest.mark.parametrize(("device", "gpus", "index", "placed"), [
    ("cuda", 2, 0, "cuda:0"), ("cuda", 2, 1, "cuda:1"), ("cuda", 2, 2, "cuda:0"), ("auto", 4, 3, "cuda:3"),
    ("cuda", 1, 5, "cuda:0"), ("auto", 0, 1, "auto"), ("cpu", 2, 1, "cpu"),
])
def test_engines_spread_over_the_gpus_visible(monkeypatch, device, gpus, index, placed):
    """On a host with N GPUs, CAPEEN_ENGINES=N puts one engine on each instead of N on the first."""
    from service.engine_process import placed_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert placed_device(device, index) == placed


def test_engines_that_cannot_start_are_one_error(tmp_path):
    from service.runtime import load_engines
    from service.settings import Settings

    with pytest.raises(EngineStartError, match="no-such-checkpoint"):
        load_engines(Settings(checkpoint=tmp_path / "no-such-checkpoint", engines=2, log_level="warning"))
