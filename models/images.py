"""Robust loading of user-supplied images (CLI arguments and HTTP uploads) into plain RGB.

Every failure is an `ImageError` with a one-line message and a machine-readable `kind`, so the CLI can print it
and the HTTP service can map it to a status code, never leaking a Pillow traceback. The size limit is checked
from the header before any pixel is decoded, so a tiny file claiming gigapixels costs nothing.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

DEFAULT_MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 512 * 2**20  # an image file read from a path (uploads have the service's own, lower limit)
KINDS = ("empty", "not_image", "truncated", "too_large", "unsupported", "unreadable")
_WHITE = (255, 255, 255)
# what a folder given to `capeen caption` is searched for (a named file is tried whatever its name)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What Pillow may open, by its format names: the formats documented, and nothing else. Some of Pillow's other
# plugins decode pixels while they open a file (ICO decodes the PNG inside it), before the pixel limit is checked.
# (JPEG opens a camera's MPO file too.)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
FORMATS_NAMED = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# libjpeg decodes every scan of a progressive JPEG in full: a file of a few hundred kB that repeats its last scan
# thousands of times costs minutes of CPU. Encoders write about 10 scans (libjpeg's progressive script), so more
# than this is refused, as libjpeg-turbo's `djpeg -maxscans` lets one refuse it.
MAX_JPEG_SCANS = 100
# and so many passes over the pixels in all: a 50-megapixel photo's 10 scans are 5e8; 96 scans of 36 megapixels
# took 2.7 s of CPU to decode, against 0.4 s for a real 8 MB progressive photo
MAX_JPEG_SCAN_PIXELS = 1_000_000_000
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Signatures of the common formats: a file that starts like one but that Pillow cannot identify is broken (cut
# before its first pixel chunk, say), not some other kind of file.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(ValueError):
    """An image that cannot be used. `kind` is one of KINDS; the message is one line; `path`, where known, is
    the file or folder it is about."""

    def __init__(self, kind: str, message: str, path: Path | None = None) -> None:
        assert kind in KINDS, kind
        super().__init__(" ".join(message.split()))
        self.kind = kind
        self.path = path


def _read_source(source: bytes | bytearray | memoryview | str | Path) -> tuple[bytes, str]:
    """The bytes and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "image"
    return read_image_file(source), str(source)


def read_image_file(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of an image file, read whole, or an ImageError naming the file: a path that vanishes or is a
    directory fails here, with a clear message, instead of inside Pillow. Never more than `limit` bytes
    (default `MAX_FILE_BYTES`) are read (/dev/zero or a huge file would eat all memory); a longer file is
    `too_large`."""
    path = Path(path)
    limit = MAX_FILE_BYTES if limit is None else limit
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise ImageError("unreadable", f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError("unreadable", f"{path}: is a directory, not an image file") from None
    except OSError as exc:
        raise ImageError("unreadable", f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        size = f"{limit // 2**20} MiB" if limit % 2**20 == 0 else f"{limit} bytes"
        raise ImageError("too_large", f"{path}: larger than {size}, too large for an image file")
    return data


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open (header only) and enforce the pixel limit before decoding."""
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own limit (the service sets it to CAPEEN_MAX_PIXELS), and errors at twice
            # it; the check below says the same with the image's size, so only the error is left to Pillow here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("too_large", f"{name}: too many pixels (decompression bomb guard)") from None
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ImageError("truncated", f"{name}: truncated or corrupt image header") from None
        raise ImageError("not_image", f"{name}: not an image in a supported format ({FORMATS_NAMED})") from None
    except Exception as exc:  # a header Pillow recognises but cannot parse
        raise ImageError("truncated", f"{name}: corrupt image header ({_reason(exc)})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("truncated", f"{name}: image header says {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageError(
            "too_large", f"{name}: {width}x{height} is {width * height} pixels, more than the limit of {max_pixels}"
        )
    return image


def _jpeg_scans(data: bytes, most: int) -> int:
    """The scans of the first image in a JPEG file, counted up to `most` + 1.

    The markers are walked from the start of the image to its end (EOI): a segment is skipped by its length, so
    an EXIF thumbnail's own scan is not counted, and neither is what follows the image (a phone's motion photo
    appends a video, an MPO a second picture). In a scan's coded data an FF byte is followed by 00 (stuffing) or
    a restart marker; the first FF followed by anything else is the next marker."""
    scans, position = 0, 2  # after SOI
    while scans <= most:
        found = _NEXT_MARKER.search(data, position)
        if found is None:
            break
        marker, position = data[found.end() - 1], found.end()
        if marker == 0xD9:  # EOI
            break
        if marker == 0x01:  # TEM: no length
            continue
        position += int.from_bytes(data[position:position + 2], "big")  # the segment, or the scan's header
        scans += marker == 0xDA
    return scans


def _check_jpeg_scans(image: JpegImageFile, data: bytes, name: str) -> None:
    """Refuse, before decoding, a JPEG whose scans would take libjpeg long: more than MAX_JPEG_SCANS, or more
    full passes over its pixels than MAX_JPEG_SCAN_PIXELS allows."""
    scans = _jpeg_scans(data, MAX_JPEG_SCANS)
    width, height = image.size
    if scans > MAX_JPEG_SCANS or scans * width * height > MAX_JPEG_SCAN_PIXELS:
        shown = f"more than {MAX_JPEG_SCANS}" if scans > MAX_JPEG_SCANS else str(scans)
        raise ImageError("unsupported", f"{name}: a JPEG of {shown} scans over {width}x{height} pixels, more than "
                                        "is decoded (encoders write about 10, and each scan costs a full pass over "
                                        "the image)")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _decode(image: Image.Image, name: str) -> None:
    """Force a full decode of the first frame so that truncation and corruption surface here."""
    # Another library may have switched truncated loading on process-wide; a half-grey image would be captioned.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.seek(0)  # animated GIF/WebP/PNG: the first frame
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("too_large", f"{name}: too many pixels (decompression bomb guard)") from None
    except OSError as exc:
        if "decoder" in str(exc) and "not available" in str(exc):
            raise ImageError("unsupported", f"{name}: {image.format} images of this kind are not supported") from None
        raise ImageError("truncated", f"{name}: truncated or corrupt {image.format} image ({_reason(exc)})") from None
    except MemoryError:
        raise ImageError("too_large", f"{name}: not enough memory to decode the image") from None
    except Exception as exc:  # Pillow's decoders raise SyntaxError, ValueError, struct.error... on broken data
        raise ImageError("truncated", f"{name}: truncated or corrupt {image.format} image ({_reason(exc)})") from None


def _over_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha over white: transparent pixels would otherwise come out black."""
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale with more than 8 bits (I;16*, I, F) scaled, not clipped, into 0..255.

    One float32 copy, scaled in place: a small compressed file can hold tens of millions of such pixels, and
    each float64 temporary of those would cost hundreds of MB (eight bits of output need no more precision)."""
    values = np.array(image, dtype=np.float32)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif image.mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
        low, high = 0.0, 255.0  # 8-bit data stored as 32-bit integers
    elif image.mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535:
        low, high = 0.0, 65535.0  # 16-bit PNG/TIFF data widened to 32 bits by Pillow
    elif image.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        low, high = 0.0, 1.0  # float images conventionally hold 0..1
    else:
        low = float(np.nanmin(values)) if values.size else 0.0
        high = float(np.nanmax(values)) if values.size else 1.0
    span = high - low if high > low else 1.0
    values -= low
    values *= 255.0 / span
    np.nan_to_num(values, copy=False)
    np.clip(values, 0, 255, out=values)
    np.rint(values, out=values)
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    try:
        if mode == "RGB":
            return image
        if mode.startswith("I;16") or mode in ("I", "F"):
            return _scaled_to_8bit(image)
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
            return _over_white(image)
        if mode == "L" and "transparency" in image.info:  # a grey level marked transparent (PNG tRNS)
            return _over_white(image)
        return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, RGBX, LAB, HSV...
    except Exception as exc:
        raise ImageError("unsupported", f"{name}: cannot convert a {mode} image to RGB ({_reason(exc)})") from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways), in place: a copy of an image without
    one would cost its whole size again."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # broken EXIF must not cost the image: keep it as stored
        pass
    return image


def load_image(
    source: bytes | bytearray | memoryview | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
) -> Image.Image:
    """Load an image from bytes or a path as an upright RGB image, or raise ImageError.

    `max_pixels` is checked from the header before decoding. Animated images give their first frame; alpha is
    composited over white; 16-bit and float greyscale are scaled to 8 bits.

    `min_size`: the image is only wanted at this side or smaller (the model's input). A JPEG is then decoded
    at 1/2, 1/4 or 1/8 of its size, the smallest that keeps both sides at least `min_size` (libjpeg scales
    while it decodes, in the DCT). A phone photo then costs a fraction of its full decode and memory, for a
    model input within a grey level or two of the full decode's.
    """
    data, name = _read_source(source)
    if not data:
        raise ImageError("empty", f"{name}: empty (0 bytes)")
    image = _open(data, name, max_pixels)
    if isinstance(image, JpegImageFile):  # MPO too: a phone photo with its preview
        _check_jpeg_scans(image, data, name)
        if min_size is not None:
            image.draft(image.mode, (min_size, min_size))
    _decode(image, name)
    rgb = _to_rgb(_upright(image), name)
    rgb.load()
    return rgb


def find_images(paths: Iterable[str | Path | ImageError]) -> Iterator[Path | ImageError]:
    """The image files that `paths` name, in order: a file as it is, a folder as the image files under it
    (`IMAGE_SUFFIXES`, any case), walked depth first in name order so that a rerun lists them alike; an
    ImageError (a list of paths that could not be read on) as it is.

    Walked lazily: a folder of millions of photos starts captioning at once. A folder that holds no image
    file, or that cannot be read, yields an ImageError in its place instead of stopping the walk. Hidden
    files and folders (a leading dot: `.thumbnails/`, macOS's `._photo.jpg`) are not searched."""
    for given in paths:
        if isinstance(given, ImageError):
            yield given
            continue
        path = Path(given)
        if not path.is_dir():
            yield path
            continue
        found = unreadable = False
        problems: list[OSError] = []
        walk = os.walk(path, onerror=problems.append)
        while True:
            step = next(walk, None)
            while problems:  # os.walk reports a folder it cannot list through onerror, and goes on
                error = problems.pop(0)
                unreadable = True
                yield ImageError("unreadable", f"{error.filename}: cannot list this folder: {error.strerror or error}",
                                 Path(error.filename))
            if step is None:
                break
            folder, subfolders, files = step
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                    found = True
                    yield Path(folder) / name
        if not (found or unreadable):
            yield ImageError("unreadable", f"{path}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})",
                             path)
