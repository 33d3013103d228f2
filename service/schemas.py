"""Request and response bodies of the routes; as pydantic models they make the OpenAPI schema exact."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field


class Mode(str, Enum):
    adaptive = "adaptive"  # the bandit picks the threshold
    fixed = "fixed"  # the given threshold, else the calibrated one
    full = "full"  # every decoder layer


class CaptionOptions(BaseModel):
    """The options of POST /caption and POST /caption/batch. A field the form does not name is refused (422), not
    ignored: a misspelt option would otherwise fall back to its default without a word."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field(Mode.adaptive, description="adaptive: the bandit picks the threshold; fixed: `threshold`, "
                                                  "default the calibrated one; full: every decoder layer")
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="confidence threshold of mode=fixed")
    max_tokens: int | None = Field(None, ge=1, description="longest caption in tokens (default and cap: "
                                                           "GET /v1/model's max_tokens)")


class CaptionForm(CaptionOptions):
    """The multipart form of POST /caption."""

    image: UploadFile = Field(description="the image file")


class BatchCaptionForm(CaptionOptions):
    """The multipart form of POST /caption/batch: the options hold for every image."""

    image: list[UploadFile] = Field(description="the image files, one part each, all named image (curl -F "
                                                "image=@a.jpg -F image=@b.png); at most GET /v1/model's "
                                                "max_images_per_request")


class Timings(BaseModel):
    queue_ms: float = Field(description="time waiting in the queue for a batch")
    encode_ms: float = Field(description="image encoder time of the batch the request was decoded in")
    decode_ms: float = Field(description="caption decoding time of that batch")
    total_ms: float = Field(description="from the request's arrival to the response")


class Caption(BaseModel):
    caption: str
    tokens: list[str] = Field(description="the caption's words")
    exit_layers: list[int] = Field(description="1-based decoder layer each word left at, aligned with tokens")
    mean_exit_layer: float = Field(description="mean exit layer over every decoding step, end token included")
    threshold: float | None = Field(description="confidence threshold decoded with; null for mode=full")
    arm: int | None = Field(description="index of the bandit arm (GET /v1/bandit) for mode=adaptive, else null")
    policy: str | None = Field(description="bandit policy for mode=adaptive, else null")
    timings: Timings


class CaptionResponse(Caption):
    model: str = Field(description="name of the checkpoint")
    request_id: str = Field(description="also in the X-Request-ID response header")


class ImageCaption(Caption):
    index: int = Field(description="0-based position of the image among the request's image parts")
    filename: str | None = Field(description="the part's file name, as the client sent it")


class ImageFailure(BaseModel):
    index: int = Field(description="0-based position of the image among the request's image parts")
    filename: str | None = Field(description="the part's file name, as the client sent it")
    status: Literal[413, 415, 422] = Field(description="what POST /caption would have answered for this image alone")
    error: str = Field(description="machine-readable kind, as in an error body: not_image, truncated, too_large...")
    detail: str = Field(description="what is wrong with this image, in one line")


class BatchCaptionResponse(BaseModel):
    results: list[ImageCaption | ImageFailure] = Field(
        description="one per image part, in the order sent: its caption, or why it has none")
    captioned: int = Field(description="results with a caption")
    failed: int = Field(description="results without one: images that could not be read")
    model: str = Field(description="name of the checkpoint")
    request_id: str = Field(description="also in the X-Request-ID response header")


class Status(BaseModel):
    status: str


class ModelInfo(BaseModel):
    name: str
    layers: int = Field(description="decoder layers")
    exits: list[int] = Field(description="1-based layers a token can leave at, the final layer included")
    exit_offsets: list[float] = Field(
        description="added to a request's threshold at each of `exits`: a token leaves at an exit once its "
                    "confidence reaches threshold + offset (the final layer's is 0)")
    calibrated_threshold: float | None
    kv_fill: Literal["propagate", "deferred"] = Field(
        description="how the keys and values of layers a token skipped are filled: propagate (CALM: from its "
                    "exited state, at once) or deferred (exact: computed when a later token runs deeper)")
    device: str = Field(description="the device of the first engine")
    devices: list[str] = Field(description="the device of each engine: on CUDA, engine i uses GPU i modulo the "
                                           "GPUs visible")
    dtype: str
    vocab_size: int
    image_size: int = Field(description="side of the square the encoder sees, in pixels")
    max_tokens: int = Field(description="longest caption a request may ask for")
    max_images_per_request: int = Field(description="most images one POST /caption/batch may carry")
    max_upload_bytes: int = Field(description="largest image file accepted, in bytes (CAPEEN_MAX_UPLOAD_BYTES)")
    engines: int = Field(description="engines decoding batches side by side, each with its own copy of the model")


class ArmStats(BaseModel):
    arm: int
    threshold: float
    pulls: int = Field(description="adaptive requests decoded with this threshold")
    observations: int = Field(description="rewards learnt for it, side observations included")
    mean_reward: float | None = Field(description="the policy's current estimate; null before any observation")


class BanditState(BaseModel):
    policy: str
    rounds: int = Field(description="adaptive requests learnt from")
    arms: list[ArmStats]
    best: ArmStats = Field(description="the arm with the highest estimated reward")
