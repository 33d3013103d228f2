"""The FastAPI application: `create_app(settings)` wires settings, metrics, middleware, errors and routers.

The lifespan does the slow and stateful parts: it loads (unless given an engine) and warms the model,
restores the bandit and starts the batcher before the server takes requests, and at shutdown drains the
queue and writes the bandit snapshot. The batching loop lives in service.batcher, apart from HTTP, and the
model in a process of its own (service.engine_process) unless the settings say otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from service.engine_process import Engine
from service.errors import ERROR_KINDS, install_error_handlers
from service.metrics import HttpMetrics
from service.middleware import BodyLimit, CompleteMultipart, RequestContext
from service.routes import bandit, caption, health, model
from service.runtime import start_runtime
from service.settings import Settings
from service.uploads import FORM_OVERHEAD_BYTES, batch_body_limit, upload_limit_detail

DESCRIPTION = """Image captioning with early-exit decoding (CAPEEN) and a per-request threshold bandit (A-CAPEEN).

Every error is JSON `{"error": kind, "detail": message}`."""


def _version() -> str:
    try:
        return version("capeen")
    except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not installed
        return "0+source"


def create_app(settings: Settings | None = None, engines: Sequence[Engine] = ()) -> FastAPI:
    """The app; `engines` are already loaded ones (the CLI loads them first to report a bad checkpoint in one
    line); none: the lifespan loads them."""
    settings = settings or Settings()
    registry = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = start_runtime(settings, registry, engines)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.close()

    app = FastAPI(title="CAPEEN captioning service", version=_version(), description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.http_metrics = HttpMetrics(registry, caption_routes=("/caption", caption.BATCH_PATH),
                                         error_kinds=ERROR_KINDS)
    install_error_handlers(app)
    # The last added middleware is the outermost: the request context times everything, the limit included.
    app.add_middleware(CompleteMultipart)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
                       detail=upload_limit_detail(settings.max_upload_bytes), timeout_s=settings.request_timeout_s,
                       path_limits={caption.BATCH_PATH: batch_body_limit(settings.images_per_request,
                                                                         settings.max_upload_bytes)})
    app.add_middleware(RequestContext, metrics=app.state.http_metrics)
    for router in (caption.router, health.router, model.router, bandit.router):
        app.include_router(router)
    return app
