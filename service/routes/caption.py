"""POST /caption: one uploaded image in, its caption and how deep each word was decoded out.
POST /caption/batch: several images in one request, each answered with its caption or why it has none."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, File, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from bandit import Arm
from service.batcher import Abandoned, DeadlineExceeded, EngineFailed, Outcome, QueueFull, ShuttingDown
from service.dependencies import RETRY_AFTER, RuntimeDep
from service.errors import ServiceError, error_responses
from service.runtime import Runtime
from service.schemas import (BatchCaptionForm, BatchCaptionResponse, CaptionForm, CaptionOptions, CaptionResponse,
                             ImageCaption, ImageFailure, Mode, Timings)
from service.uploads import image_pixels, read_upload

router = APIRouter(tags=["caption"])

BATCH_PATH = "/caption/batch"

_SINGLE_ROUTE_ERRORS = error_responses(400, 408, 413, 415, 422, 500, 503, 504)
# in a batch, what is wrong with one image is said in its result, and these statuses are the request's own
_BATCH_ROUTE_ERRORS = error_responses(400, 408, 413, 415, 422, 500, 503, 504, described={
    413: "a body larger than CAPEEN_MAX_IMAGES_PER_REQUEST uploads of CAPEEN_MAX_UPLOAD_BYTES (upload_too_large); "
         "one image over either limit gets its failure among the results",
    415: "a body that is not multipart/form-data (not_multipart); an image that cannot be decoded gets its failure "
         "among the results",
    422: "no image, more images than CAPEEN_MAX_IMAGES_PER_REQUEST, a bad, empty or repeated option, an unknown "
         "field or a query parameter (invalid_request)",
})


# How a request that did not get its caption is answered: status, error kind, headers.
_BATCHER_FAILURES: dict[type[Exception], tuple[int, str, dict[str, str] | None]] = {
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


def refusing_unread_fields(images: Literal["one", "many"]) -> Callable[[Request], Awaitable[None]]:
    """A dependency: 415 for a body that is not a form, 422 for a query parameter or for an option sent twice
    (the forms refuse unknown fields); `images`, the rule for the image field, says whether it may repeat.

    FastAPI would read a raw image or JSON body as a form without fields, and answer that `image` is missing;
    it would ignore the others: `?mode=full` would decode in the default mode and of two values one would be
    dropped, without a word, and the caller would get an answer to a question it did not ask.
    """
    repeatable = {"image"} if images == "many" else set()

    async def refuse_unread_fields(request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
            raise ServiceError(415, "not_multipart", f"the body must be multipart/form-data, with the image in a field "
                                                     f"named image (curl -F image=@photo.jpg); got "
                                                     f"{content_type or 'no Content-Type'}")
        if request.query_params:
            names = ", ".join(sorted(set(request.query_params.keys())))
            raise ServiceError(422, "invalid_request", f"query parameters are not read ({names}): send options as "
                                                       f"multipart form fields, e.g. -F mode=full")
        fields = (await request.form()).multi_items()  # parsed and cached by FastAPI already
        names = [name for name, _ in fields]
        repeated = sorted({name for name in names if names.count(name) > 1} - repeatable)
        if repeated:
            allowed = ("one value per option per request (the image field may repeat)" if repeatable else
                       "one image and one value per option per request (POST /caption/batch takes several images)")
            raise ServiceError(422, "invalid_request", f"form field(s) {', '.join(repeated)} sent more than once: "
                                                       f"{allowed}")
        # FastAPI takes an empty value for an absent one: `-F mode=$MODE` with MODE unset would decode in the
        # default mode without a word
        empty = sorted({name for name, value in fields if name in CaptionOptions.model_fields
                        and isinstance(value, str) and not value.strip()})
        if empty:
            raise ServiceError(422, "invalid_request", f"form field(s) {', '.join(empty)} sent empty: give a value, "
                                                       "or leave the field out for its default")

    return refuse_unread_fields


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


def _checked_options(runtime: Runtime, options: CaptionOptions) -> tuple[float | None, int]:
    """The fixed threshold of the request's options (None: the bandit chooses) and its token limit."""
    mode, threshold, max_tokens = options.mode, options.threshold, options.max_tokens
    if threshold is not None and mode is not Mode.fixed:
        raise ServiceError(422, "invalid_request", f"threshold applies to mode=fixed only, not to mode={mode.value}")
    if max_tokens is not None and max_tokens > runtime.max_tokens:
        raise ServiceError(422, "invalid_request", f"max_tokens must be at most {runtime.max_tokens}")
    return _fixed_threshold(runtime, mode, threshold), max_tokens or runtime.max_tokens


async def _pixels(request: Request, runtime: Runtime, upload: UploadFile) -> torch.Tensor:
    """An uploaded image as the engine's pixels; a ServiceError (413, 415 or 422) names what is wrong with it, a
    499 says that the client left before its turn came, and a 504 that the request's deadline passed first."""
    settings = runtime.settings
    # slow images ahead (a decode cannot be stopped) must not keep a request waiting past its deadline
    remaining = settings.request_timeout_s - (time.perf_counter() - request.state.started)
    try:
        await asyncio.wait_for(runtime.decode_slots.acquire(), timeout=max(remaining, 0.0))
    except asyncio.TimeoutError:
        raise ServiceError(504, "timeout", "the request's deadline passed while its image waited for its turn to be "
                                           "decoded") from None
    try:  # its bytes too: a batch's uploads are not all in memory at once
        if await request.is_disconnected():  # nobody would read the caption: no decoding for it
            raise ServiceError(499, "client_closed", "the client closed the connection before its image was decoded")
        data = await read_upload(upload, settings.max_upload_bytes)
        return await run_in_threadpool(image_pixels, runtime.engine, data, settings.max_pixels,
                                       settings.jpeg_scaled_decode)
    finally:
        runtime.decode_slots.release()


async def _captions(request: Request, runtime: Runtime, pixels: list[torch.Tensor], fixed: float | None,
                    max_tokens: int) -> list[tuple[Outcome, Arm | None]]:
    """Queue the images together, each with its threshold (the bandit's arm when `fixed` is None), and wait for
    their captions; a ServiceError when the request as a whole gets none."""
    arms = [runtime.bandit.select() if fixed is None else None for _ in pixels]  # late: the freshest statistics
    if await request.is_disconnected():  # gone while its images were decoded: no engine time, no bandit update
        raise ServiceError(499, "client_closed", "the client closed the connection before its images were queued")
    started: float = request.state.started
    remaining = runtime.settings.request_timeout_s - (time.perf_counter() - started)
    images = [(image, fixed if arm is None else arm.threshold, arm) for image, arm in zip(pixels, arms, strict=True)]
    try:
        outcomes = await runtime.batcher.caption_all(images, max_tokens, timeout=remaining,
                                                     abandoned=partial(_until_disconnected, request))
    except tuple(_BATCHER_FAILURES) as exc:
        status, kind, headers = _BATCHER_FAILURES[type(exc)]
        raise ServiceError(status, kind, str(exc), headers=headers) from None
    return list(zip(outcomes, arms, strict=True))


def _caption_fields(runtime: Runtime, request: Request, outcome: Outcome, arm: Arm | None) -> dict[str, object]:
    """What a caption's result says of it, alone or among a batch's."""
    result = outcome.result
    return dict(
        caption=result.caption,
        tokens=result.tokens,
        exit_layers=result.exit_layers,
        mean_exit_layer=result.mean_exit_layer,
        threshold=result.threshold,
        arm=None if arm is None else arm.index,
        policy=None if arm is None else runtime.bandit.policy.name,
        timings=Timings(queue_ms=_ms(outcome.queue_s), encode_ms=_ms(outcome.encode_s),
                        decode_ms=_ms(outcome.decode_s), total_ms=_ms(time.perf_counter() - request.state.started)),
    )


@router.post("/caption", response_model=CaptionResponse, responses=_SINGLE_ROUTE_ERRORS,
             dependencies=[Depends(refusing_unread_fields(images="one"))],
             summary="caption an image (JPEG, PNG, WebP, BMP, GIF: first frame)")
async def caption(
    request: Request,
    runtime: RuntimeDep,
    form: Annotated[CaptionForm, File(description="the image and the options")],
) -> CaptionResponse:
    fixed, max_tokens = _checked_options(runtime, form)
    with runtime.batcher.incoming():
        pixels = await _pixels(request, runtime, form.image)
    [(outcome, arm)] = await _captions(request, runtime, [pixels], fixed, max_tokens)
    runtime.metrics.captions.inc()
    return CaptionResponse(**_caption_fields(runtime, request, outcome, arm), model=runtime.engine.name,
                           request_id=request.state.request_id)


@router.post(BATCH_PATH, response_model=BatchCaptionResponse, responses=_BATCH_ROUTE_ERRORS,
             dependencies=[Depends(refusing_unread_fields(images="many"))],
             summary="caption several images in one request: each gets its caption, or why it has none")
async def caption_batch(
    request: Request,
    runtime: RuntimeDep,
    form: Annotated[BatchCaptionForm, File(description="the images and the options, which hold for all of them")],
) -> BatchCaptionResponse:
    """The images are queued together, and decoded with other requests' (a request of 16 fills a batch alone). An
    image that cannot be read gets a failure in its place, with the status and error POST /caption would have
    answered for it alone, and the others are captioned. The request as a whole fails for what concerns all of
    its images: a bad option, too many images, a body over the limit, a queue without room for all of them, its
    deadline, an engine failure."""
    fixed, max_tokens = _checked_options(runtime, form)
    settings = runtime.settings
    if len(form.image) > settings.images_per_request:
        setting = "CAPEEN_MAX_IMAGES_PER_REQUEST" if settings.images_per_request == settings.max_images_per_request \
            else "CAPEEN_QUEUE_SIZE"
        raise ServiceError(422, "invalid_request", f"{len(form.image)} images in one request; at most "
                                                   f"{settings.images_per_request} ({setting}): split them over "
                                                   "several")

    async def pixels_or_failure(index: int, upload: UploadFile) -> torch.Tensor | ImageFailure:
        try:
            return await _pixels(request, runtime, upload)
        except ServiceError as exc:
            if exc.status_code in (499, 504):  # the request's end (client gone, deadline), not this image's problem
                raise
            return ImageFailure(index=index, filename=upload.filename, status=exc.status_code, error=exc.error,
                                detail=str(exc.detail))

    with runtime.batcher.incoming():  # decoded side by side, as far as CAPEEN_DECODE_CONCURRENCY lets them
        # a client that leaves stops the rest: each image still waiting for its turn finds it gone
        decoded = await asyncio.gather(*(pixels_or_failure(index, upload) for index, upload in enumerate(form.image)))
    readable = [(index, pixels) for index, pixels in enumerate(decoded) if isinstance(pixels, torch.Tensor)]
    captioned = await _captions(request, runtime, [pixels for _, pixels in readable], fixed, max_tokens) \
        if readable else []
    results: list[ImageCaption | ImageFailure] = [item for item in decoded if isinstance(item, ImageFailure)]
    results += [ImageCaption(**_caption_fields(runtime, request, outcome, arm), index=index,
                             filename=form.image[index].filename)
                for (index, _), (outcome, arm) in zip(readable, captioned, strict=True)]
    results.sort(key=lambda result: result.index)
    runtime.metrics.captions.inc(len(captioned))
    for result in results:  # counted once answered: a request refused as a whole tells its client of none of them
        if isinstance(result, ImageFailure):
            request.app.state.http_metrics.errors.labels(kind=result.error).inc()
    return BatchCaptionResponse(results=results, captioned=len(captioned), failed=len(decoded) - len(readable),
                                model=runtime.engine.name, request_id=request.state.request_id)
