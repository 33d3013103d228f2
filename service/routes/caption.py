"""POST /caption: one uploaded image in, its caption and how deep each word was decoded out."""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request
from starlette.concurrency import run_in_threadpool

from service.batcher import Abandoned, DeadlineExceeded, EngineFailed, QueueFull, ShuttingDown
from service.dependencies import RETRY_AFTER, RuntimeDep
from service.errors import ServiceError, error_responses
from service.runtime import Runtime
from service.schemas import CaptionForm, CaptionResponse, Mode, Timings
from service.uploads import image_pixels, read_upload

router = APIRouter(tags=["caption"])


# How a request that did not get its caption is answered: status, error kind, headers.
_BATCH_ERRORS: dict[type[Exception], tuple[int, str, dict[str, str] | None]] = {
    QueueFull: (503, "queue_full", RETRY_AFTER),
    ShuttingDown: (503, "shutting_down", RETRY_AFTER),
    DeadlineExceeded: (504, "timeout", None),
    Abandoned: (499, "client_closed", None),  # nginx's code; nobody reads it, the metrics do
    EngineFailed: (500, "engine_failed", None),
}


async def _until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def refuse_unread_fields(request: Request) -> None:
    """415 for a body that is not a form, 422 for a query parameter or a form field sent twice (CaptionForm
    refuses unknown fields).

    FastAPI would read a raw image or JSON body as a form without fields, and answer that `image` is missing;
    it would ignore the others: `?mode=full` would decode in the default mode and of two images one would be
    dropped, without a word, and the caller would get an answer to a question it did not ask.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise ServiceError(415, "not_multipart", f"the body must be multipart/form-data, with the image in a field "
                                                 f"named image (curl -F image=@photo.jpg); got "
                                                 f"{content_type or 'no Content-Type'}")
    if request.query_params:
        names = ", ".join(sorted(set(request.query_params.keys())))
        raise ServiceError(422, "invalid_request", f"query parameters are not read ({names}): send options as "
                                                   f"multipart form fields, e.g. -F mode=full")
    names = [name for name, _ in (await request.form()).multi_items()]  # parsed and cached by FastAPI already
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ServiceError(422, "invalid_request", f"form field(s) {', '.join(repeated)} sent more than once: "
                                                   "one image and one value per option per request")


def _fixed_threshold(runtime: Runtime, mode: Mode, threshold: float | None) -> float | None:
    """The threshold of mode fixed or full; None for adaptive, where the bandit chooses."""
    if mode is Mode.adaptive:
        return None
    try:
        return runtime.engine.threshold_for(mode.value, threshold)
    except ValueError as exc:  # fixed mode on a checkpoint without a calibrated threshold
        raise ServiceError(422, "invalid_request", str(exc)) from None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@router.post("/caption", response_model=CaptionResponse,
             responses=error_responses(400, 408, 413, 415, 422, 503, 504),
             dependencies=[Depends(refuse_unread_fields)],
             summary="caption an image (JPEG, PNG, WebP, BMP, GIF: first frame)")
async def caption(
    request: Request,
    runtime: RuntimeDep,
    form: Annotated[CaptionForm, File(description="the image and the options")],
) -> CaptionResponse:
    settings = runtime.settings
    mode, threshold, max_tokens = form.mode, form.threshold, form.max_tokens
    if threshold is not None and mode is not Mode.fixed:
        raise ServiceError(422, "invalid_request", f"threshold applies to mode=fixed only, not to mode={mode.value}")
    if max_tokens is not None and max_tokens > runtime.max_tokens:
        raise ServiceError(422, "invalid_request", f"max_tokens must be at most {runtime.max_tokens}")
    fixed = _fixed_threshold(runtime, mode, threshold)
    with runtime.batcher.incoming():
        data = await read_upload(form.image, settings.max_upload_bytes)
        async with runtime.decode_slots:
            pixels = await run_in_threadpool(image_pixels, runtime.engine, data, settings.max_pixels,
                                             settings.jpeg_scaled_decode)
    arm = runtime.bandit.select() if fixed is None else None  # as late as possible: the freshest statistics
    chosen = fixed if arm is None else arm.threshold

    if await request.is_disconnected():  # gone while its image was decoded: no engine time, no bandit update
        raise ServiceError(499, "client_closed", "the client closed the connection before its image was queued")
    started: float = request.state.started
    remaining = settings.request_timeout_s - (time.perf_counter() - started)
    try:
        outcome = await runtime.batcher.caption(pixels, chosen, max_tokens or runtime.max_tokens, arm,
                                                timeout=remaining, abandoned=partial(_until_disconnected, request))
    except tuple(_BATCH_ERRORS) as exc:
        status, kind, headers = _BATCH_ERRORS[type(exc)]
        raise ServiceError(status, kind, str(exc), headers=headers) from None

    result = outcome.result
    return CaptionResponse(
        caption=result.caption,
        tokens=result.tokens,
        exit_layers=result.exit_layers,
        mean_exit_layer=result.mean_exit_layer,
        threshold=result.threshold,
        arm=None if arm is None else arm.index,
        policy=None if arm is None else runtime.bandit.policy.name,
        timings=Timings(queue_ms=_ms(outcome.queue_s), encode_ms=_ms(outcome.encode_s),
                        decode_ms=_ms(outcome.decode_s), total_ms=_ms(time.perf_counter() - started)),
        model=runtime.engine.name,
        request_id=request.state.request_id,
    )
