"""Prometheus metrics of the service, in base units, all prefixed `capeen_`.

Each app has a registry of its own, so /metrics shows exactly the service's figures and two apps in one
process (as in the tests) never collide. The HTTP metrics exist from the app's creation; the serving
metrics need the model (the exit-layer histogram has one bucket per decoder layer) and are created when the
lifespan has loaded it. the README explains each metric and the PromQL for speedup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from models.decoding import DecodeTrace
from models.engine import BatchTimings

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A request's reward is a mean of C_i - C_1 - mu * p_i / L: mostly small, below zero when depth did not pay.
REWARD_BUCKETS = (-0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
ENGINE_STAGES = ("encode", "decode")


# what the caption routes answer (service.errors has the kinds behind each error status)
CAPTION_STATUSES = ("200", "400", "405", "408", "413", "415", "422", "499", "500", "503", "504")


class HttpMetrics:
    """What every route reports: requests, their duration and error responses by kind.

    The series of the caption routes' statuses and of every error kind exist from the start, at 0. A series
    that appeared with its first event would hide that event from rate() and increase(), since Prometheus's
    first sample of it already holds it: a first burst of 503s used to show as no error at all."""

    def __init__(self, registry: CollectorRegistry, caption_routes: tuple[str, ...] = (),
                 error_kinds: tuple[str, ...] = ()) -> None:
        self.requests = Counter("capeen_requests", "HTTP requests answered, by route template and status code",
                                ["route", "status"], registry=registry)
        self.duration = Histogram("capeen_request_duration_seconds", "time from a request's arrival to its "
                                  "response, by route template and status code", ["route", "status"],
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = Counter("capeen_errors", "error responses by kind (the `error` field of the body)", ["kind"],
                              registry=registry)
        for route in caption_routes:
            for status in CAPTION_STATUSES:
                self.requests.labels(route=route, status=status)
                self.duration.labels(route=route, status=status)
        for kind in error_kinds:
            self.errors.labels(kind=kind)


def _batch_buckets(max_batch_size: int) -> list[float]:
    """One bucket per size up to 64 (quantiles of a handful of whole sizes are exact only so), then doubling."""
    if max_batch_size <= 64:
        return [float(size) for size in range(1, max_batch_size + 1)]
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(float(s) for s in sizes)


class ServingMetrics:
    """The batcher's, the decoder's and the bandit's figures."""

    def __init__(self, registry: CollectorRegistry, *, n_layer: int, max_batch_size: int, engines: int = 1) -> None:
        self.n_layer = n_layer
        self.queue_duration = Histogram("capeen_queue_duration_seconds", "time an image waited in the queue "
                                        "before its batch started", buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("capeen_batch_size", "images per engine call",
                                    buckets=_batch_buckets(max_batch_size), registry=registry)
        self.batch_duration = Histogram("capeen_batch_duration_seconds", "wall time of each engine call (one "
                                        "batch; the pipe to the engine process included), by engine: the rate of "
                                        "its sum is the share of time that engine is busy", ["engine"],
                                        buckets=LATENCY_BUCKETS, registry=registry)
        self.engine_compute = Counter("capeen_engine_compute_seconds", "seconds each engine spent encoding images "
                                      "and decoding captions, by stage", ["engine", "stage"], registry=registry)
        for engine in range(engines):  # every series exists from the start, so that rate() works from the first
            self.batch_duration.labels(engine=str(engine))
            for stage in ENGINE_STAGES:
                self.engine_compute.labels(engine=str(engine), stage=stage)
        self.queue_depth = Gauge("capeen_queue_depth", "images waiting for a batch whose clients still wait",
                                 registry=registry)
        self.captions = Counter("capeen_captions", "captions answered, one per image, from POST /caption and POST "
                                "/caption/batch alike", registry=registry)
        self.tokens = Counter("capeen_tokens_generated", "decoding steps run, end-of-caption token included",
                              registry=registry)
        self.token_exit_layer = Histogram("capeen_token_exit_layer", "1-based decoder layer each generated token "
                                          "left at (one observation per token)",
                                          buckets=[float(layer) for layer in range(1, n_layer + 1)],
                                          registry=registry)
        self.layers_computed = Counter("capeen_decoder_layers_computed", "decoder layers computed over all tokens "
                                       "(with kv_fill=deferred, also those computed later for positions that had "
                                       "left early)", registry=registry)
        self.layers_full = Counter("capeen_decoder_layers_full", "decoder layers a full-depth decode of the same "
                                   "tokens would have computed", registry=registry)
        self.arm_pulls = Counter("capeen_bandit_arm_pulls", "adaptive requests decoded with each arm (threshold)",
                                 ["arm"], registry=registry)
        self.bandit_threshold = Gauge("capeen_bandit_threshold", "threshold of the arm the bandit rates best now",
                                      registry=registry)
        self.bandit_changes = Counter("capeen_bandit_changes_detected", "times the bandit (cd-ucb) detected that "
                                      "the rewards moved and started learning afresh", registry=registry)
        self.bandit_reward = Histogram("capeen_bandit_reward", "reward of each adaptive request",
                                       buckets=REWARD_BUCKETS, registry=registry)
        self.engine_restarts = Counter("capeen_engine_restarts", "times the engine process was found dead and "
                                       "started again", registry=registry)
        self.model = Info("capeen_model", "the loaded model", registry=registry)

    def track_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth at scrape time, so it is never stale."""
        self.queue_depth.set_function(depth)

    def observe_batch(self, engine: int, seconds: float, timings: BatchTimings | None) -> None:
        """One call of engine number `engine`: its wall time, and (when it answered) the engine's own encode and
        decode time."""
        self.batch_duration.labels(engine=str(engine)).observe(seconds)
        if timings is not None:
            for stage, seconds in zip(ENGINE_STAGES, (timings.encode_s, timings.decode_s), strict=True):
                self.engine_compute.labels(engine=str(engine), stage=stage).inc(seconds)

    def observe_trace(self, trace: DecodeTrace) -> None:
        for layer in trace.exit_layers:
            self.token_exit_layer.observe(layer)
        self.tokens.inc(len(trace.exit_layers))
        self.layers_computed.inc(trace.layers_computed())
        self.layers_full.inc(self.n_layer * len(trace.exit_layers))

    def describe_model(self, info: Mapping[str, object]) -> None:
        self.model.info({key: _label_value(value) for key, value in info.items()})


def _label_value(value: object) -> str:
    """A label as PromQL users write it: lists comma-separated (`1,2,6,10`), an absent value empty (a label
    that PromQL treats as not set), not Python's `[1, 2]` and `None`."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(_label_value(item) for item in value)
    return str(value)
