"""An uploaded file -> the engine's pixel tensor, with every way that can fail mapped to an HTTP error."""

from __future__ import annotations

import torch
from fastapi import UploadFile

from models.images import ImageError, load_image
from service.engine_process import Engine
from service.errors import ServiceError

CHUNK_BYTES = 1024 * 1024
# The request body holds the file plus multipart framing and the small option fields.
FORM_OVERHEAD_BYTES = 64 * 1024

IMAGE_ERROR_STATUS = {
    "too_large": 413,  # more pixels than CAPEEN_MAX_PIXELS, found from the header before decoding
    "not_image": 415,
    "unsupported": 415,
    "empty": 422,
    "truncated": 422,
    "unreadable": 422,
}


def upload_limit_detail(limit: int) -> str:
    return f"the upload is larger than {limit} bytes (CAPEEN_MAX_UPLOAD_BYTES)"


def batch_body_limit(images: int, limit: int) -> tuple[int, str]:
    """The most bytes a POST /caption/batch body may hold, and what its 413 says: as many as `images` requests
    of one image each, framing included."""
    return (images * (limit + FORM_OVERHEAD_BYTES),
            f"the request is larger than {images} uploads of {limit} bytes each (CAPEEN_MAX_IMAGES_PER_REQUEST, "
            "CAPEEN_MAX_UPLOAD_BYTES), with 64 KiB for each one's multipart framing")


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes; 413 as soon as more than `limit` arrive (never reads more than limit + 1)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(min(CHUNK_BYTES, limit + 1 - size)):
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, "upload_too_large", upload_limit_detail(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def image_pixels(engine: Engine, data: bytes, max_pixels: int, scaled_decode: bool = True) -> torch.Tensor:
    """Decode and preprocess one image (CPU work: the routes run it in a worker thread). `scaled_decode`: a
    JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale that still covers the model's input."""
    try:
        image = load_image(data, max_pixels=max_pixels,
                           min_size=engine.config.image_size if scaled_decode else None)
    except ImageError as exc:
        raise ServiceError(IMAGE_ERROR_STATUS[exc.kind], exc.kind, str(exc)) from None
    return engine.pixels([image])
