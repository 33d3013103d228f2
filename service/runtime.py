"""What the lifespan builds and tears down: the warmed engine, the bandit, the batcher and their metrics.

The routes reach all of it through `app.state.runtime` (service.dependencies); until it exists, and again
once shutdown has begun, the service is not ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from bandit import make_policy, parse_grid
from models import kernels
from models.engine import CaptionEngine, CaptionResult
from service.adaptive import AdaptiveThreshold
from service.batcher import Batcher, Job
from service.engine_process import Engine, EngineProcess, start_engines
from service.engine_spawn import SpawnedEngine, engine_options
from service.metrics import ServingMetrics
from service.settings import Settings

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0  # at shutdown, for the batches in progress (compose's stop_grace_period leaves 10 s)


def load_engines(settings: Settings, spawned: Sequence[SpawnedEngine] = ()) -> list[Engine]:
    """The settings' checkpoint on their device: `engines` child processes (those `spawned` already, or started
    now side by side), or one engine in the service's process when `engine_process` is off.

    Raises CheckpointError or ValueError (in-process) or EngineStartError (child) with a one-line reason; a
    child that did start is stopped again when another one fails."""
    if not settings.engine_process:
        return [CaptionEngine.from_checkpoint(settings.checkpoint, device=settings.device, half=settings.half,
                                              kv_fill=settings.kv_fill)]
    return start_engines(engine_options(settings), settings.engines, settings.engine_timeout_s, spawned)


def exit_positions(engine: Engine) -> list[int]:
    """1-based layers a token can leave at: every exit head and the final layer."""
    return sorted({*engine.exit_layers, engine.config.n_layer})


def exit_offsets(engine: Engine) -> list[float]:
    """What the engine adds to a threshold at each of `exit_positions` (the final layer's is 0)."""
    return [*engine.exit_offsets, 0.0]


@dataclass
class Runtime:
    settings: Settings
    engines: list[Engine]  # copies of one model: the routes ask the first about it
    metrics: ServingMetrics
    bandit: AdaptiveThreshold
    batcher: Batcher
    max_tokens: int  # longest caption a request may ask for, and the default
    decode_slots: asyncio.Semaphore  # uploads being turned into pixels at once (each may take hundreds of MB)
    saver: asyncio.Task | None = None  # writes the bandit snapshot every bandit_save_interval_s

    @property
    def engine(self) -> Engine:
        return self.engines[0]

    @property
    def ready(self) -> bool:
        return self.batcher.running

    def describe_model(self) -> dict[str, object]:
        """The loaded model, as GET /v1/model and the capeen_model_info metric show it."""
        config = self.engine.config
        return {
            "name": self.engine.name,
            "layers": config.n_layer,
            "exits": exit_positions(self.engine),
            "exit_offsets": exit_offsets(self.engine),
            "calibrated_threshold": self.engine.calibrated_threshold,
            "kv_fill": self.engine.kv_fill,
            "device": str(self.engine.device),
            "devices": [str(engine.device) for engine in self.engines],
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "vocab_size": config.vocab_size,
            "image_size": config.image_size,
            "max_tokens": self.max_tokens,
            "max_images_per_request": self.settings.images_per_request,
            "max_upload_bytes": self.settings.max_upload_bytes,
            "engines": len(self.engines),
        }

    async def close(self) -> None:
        """Graceful stop: refuse new requests, decode the queued ones, keep what the bandit learnt.

        By the time the lifespan ends, uvicorn has waited for the requests in flight, so what is left is at
        most the batches being decoded. An engine that does not finish them within `DRAIN_TIMEOUT_S` is taken
        for hung: the snapshot is written all the same and the engine processes are killed, so that a stuck
        engine neither keeps the service from stopping nor costs what the bandit learnt."""
        if self.saver is not None:
            self.saver.cancel()
        try:
            await asyncio.wait_for(self.batcher.close(), DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.error("the engine did not finish its batches within %.0f s of shutdown; stopping without them",
                      DRAIN_TIMEOUT_S)
            for engine in self.engines:
                if isinstance(engine, EngineProcess):
                    engine.kill()
        finally:
            try:
                self.bandit.save()
            except OSError as exc:  # the folder went away or filled up since start: say so, still stop cleanly
                log.error("could not write the bandit snapshot %s: %s", self.settings.bandit_state, exc)
            for engine in self.engines:
                if isinstance(engine, EngineProcess):
                    engine.close()


async def _save_periodically(bandit: AdaptiveThreshold, interval_s: float) -> None:
    """Write the snapshot every `interval_s` while something new was learnt: a crash, an out-of-memory kill or
    a SIGKILL then loses at most that much learning, not everything since the start."""
    while True:
        await asyncio.sleep(interval_s)
        if bandit.unsaved():
            try:
                await asyncio.to_thread(bandit.save, logging.DEBUG, only_if_unsaved=True)
            except OSError as exc:  # a full disk, say: keep serving, and keep trying
                log.error("could not write the bandit snapshot %s: %s", bandit.state_path, exc)


def _record(metrics: ServingMetrics, bandit: AdaptiveThreshold, job: Job, result: CaptionResult) -> None:
    metrics.observe_trace(result.trace)
    if job.arm is not None:
        bandit.update(job.arm, result.trace)


def start_runtime(settings: Settings, registry: CollectorRegistry, engines: Sequence[Engine] = ()) -> Runtime:
    """Load (unless given) and warm the engines, restore the bandit and start the batcher; needs a running loop."""
    torch.set_num_threads(settings.torch_threads)
    kernels.set_onednn(settings.onednn)
    # Pillow's own decompression-bomb guard, at the same limit: it also holds where a plugin decodes pixels while
    # opening a file, before models.images checks the header's size (and at its default, it would cap a higher
    # CAPEEN_MAX_PIXELS)
    Image.MAX_IMAGE_PIXELS = settings.max_pixels
    engines = list(engines) or load_engines(settings)
    for engine in engines:
        engine.warmup()
    engine = engines[0]
    config = engine.config
    metrics = ServingMetrics(registry, n_layer=config.n_layer, max_batch_size=settings.max_batch_size,
                             engines=len(engines))
    for each in engines:
        if isinstance(each, EngineProcess):
            each.on_restart = metrics.engine_restarts.inc
    grid = None if settings.bandit_thresholds is None else parse_grid(settings.bandit_thresholds)
    factory = partial(make_policy, settings.policy, grid, exit_positions=exit_positions(engine),
                      exit_offsets=exit_offsets(engine), num_layers=config.n_layer,
                      calibrated=engine.calibrated_threshold, mu=settings.bandit_mu,
                      deferred_fill=engine.kv_fill == "deferred",
                      context={"model": engine.name, "kv_fill": engine.kv_fill,
                               "dtype": str(engine.dtype).removeprefix("torch.")})
    bandit = AdaptiveThreshold(factory, metrics, settings.bandit_state)
    batcher = Batcher(engines, metrics, partial(_record, metrics, bandit), max_batch_size=settings.max_batch_size,
                      max_wait_s=settings.max_wait_ms / 1000, wait_fill=settings.wait_fill,
                      queue_size=settings.queue_size)
    metrics.track_queue(batcher.depth)
    model_limit = config.n_positions - 1
    runtime = Runtime(settings, engines, metrics, bandit, batcher,
                      max_tokens=min(settings.max_tokens or model_limit, model_limit),
                      decode_slots=asyncio.Semaphore(settings.decode_concurrency))
    metrics.describe_model(runtime.describe_model())
    batcher.start()
    if settings.bandit_state is not None:
        runtime.saver = asyncio.get_running_loop().create_task(
            _save_periodically(bandit, settings.bandit_save_interval_s), name="capeen-bandit-saver")
    log.info("ready: %s on %s (%s), %d engine(s), policy %s", engine.name, engine.device,
             runtime.describe_model()["dtype"], len(engines), settings.policy)
    if engine.calibrated_threshold is None:  # said once here rather than only in every request's 422
        log.warning("%s has no calibrated threshold: mode=fixed requests must give a threshold (calibrate it with "
                    "`capeen calibrate --checkpoint DIR`); modes adaptive and full need none", engine.name)
    return runtime
