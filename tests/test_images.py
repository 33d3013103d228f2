"""Robust user image loading (`models.images`): every mode to RGB, EXIF orientation, and one-line failures."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from models.images import ImageError, load_image


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _near(pixel, expected, tolerance: int = 0) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


# -------------------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    ("image", "fmt", "expected", "tolerance"),
    [
        (Image.new("RGB", (7, 5), (10, 200, 30)), "PNG", (10, 200, 30), 0),
        (Image.new("RGB", (7, 5), (10, 200, 30)), "JPEG", (10, 200, 30), 6),
        (Image.new("RGB", (7, 5), (10, 200, 30)), "BMP", (10, 200, 30), 0),
        (Image.new("RGB", (7, 5), (10, 200, 30)), "WEBP", (10, 200, 30), 8),
        (Image.new("L", (7, 5), 77), "PNG", (77, 77, 77), 0),
        (Image.new("LA", (7, 5), (0, 0)), "PNG", (255, 255, 255), 0),  # fully transparent: white
        (Image.new("LA", (7, 5), (40, 255)), "PNG", (40, 40, 40), 0),
        (Image.new("RGBA", (7, 5), (200, 0, 0, 0)), "PNG", (255, 255, 255), 0),
        (Image.new("RGBA", (7, 5), (200, 0, 0, 255)), "PNG", (200, 0, 0), 0),
        (Image.new("RGBA", (7, 5), (0, 0, 0, 128)), "PNG", (127, 127, 127), 1),  # half over white
        (Image.new("CMYK", (7, 5), (0, 255, 255, 0)), "TIFF", (255, 0, 0), 0),
        (Image.new("CMYK", (7, 5), (0, 255, 255, 0)), "JPEG", (255, 0, 0), 6),
        (Image.new("1", (7, 5), 1), "PNG", (255, 255, 255), 0),
        (Image.new("1", (7, 5), 0), "BMP", (0, 0, 0), 0),
        (Image.new("F", (7, 5), 0.5), "TIFF", (128, 128, 128), 1),
        (Image.new("RGB", (7, 5), (0, 0, 255)).convert("YCbCr"), "TIFF", (0, 0, 255), 2),
    ],
    ids=lambda v: v.mode if isinstance(v, Image.Image) else None,
)
def test_modes_become_rgb(image: Image.Image, fmt: str, expected, tolerance: int) -> None:
    data = _encode(image, fmt)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.mode == image.mode or fmt == "JPEG"  # the file really holds the mode under test
    out = load_image(data)
    assert out.mode == "RGB" and out.size == (7, 5)
    assert _near(out.getpixel((3, 2)), expected, tolerance), out.getpixel((3, 2))


def test_palette_with_and_without_transparency() -> None:
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 0)
    plain = load_image(_encode(palette, "PNG"))
    assert plain.getpixel((3, 3)) == (250, 10, 10) and plain.getpixel((0, 0)) == (0, 0, 0)
    transparent = load_image(_encode(palette, "PNG", transparency=0))
    assert transparent.getpixel((0, 0)) == (255, 255, 255)
    assert transparent.getpixel((3, 3)) == (250, 10, 10)
    gif = load_image(_encode(palette, "GIF", transparency=0))
    assert gif.getpixel((0, 0)) == (255, 255, 255) and gif.getpixel((3, 3)) == (250, 10, 10)


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF")])
def test_sixteen_bit_is_scaled_not_clipped(mode: str, fmt: str) -> None:
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # I;16
    if mode == "I":
        image = image.convert("I")  # what Pillow makes of 16-bit data in some readers and conversions
    out = load_image(_encode(image, fmt))
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 4, 128, 255]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(250, 0, 0), (0, 0, 250), (0, 250, 0)]]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    out = load_image(data)
    assert out.size == (8, 8) and out.mode == "RGB"
    assert _near(out.getpixel((4, 4)), (250, 0, 0), 8)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # the left quarter red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(_encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    assert _near(out.getpixel((10, 3)), (255, 0, 0), 40)  # the left edge is now at the top
    assert _near(out.getpixel((10, 36)), (0, 0, 255), 40)


def _photo(width: int, height: int) -> Image.Image:
    """Smooth colour gradients with some grain, like a photo rather than flat synthetic colour."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin((x + y) / 37)], -1)
    grain = np.random.default_rng(0).normal(0, 6, rgb.shape)
    return Image.fromarray((rgb + grain).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(("size", "scaled"), [((1600, 1200), (200, 150)), ((1000, 700), (250, 175)),
                                              ((150, 400), (150, 400))])
def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_covers_the_model_input(size, scaled) -> None:
    # a phone photo served to a 96 px model: 1/8, 1/4 or 1/2 of its pixels decoded, never fewer than 96 a side
    from models.preprocess import image_to_uint8

    data = _encode(_photo(*size), "JPEG", quality=90)
    reduced, full = load_image(data, min_size=96), load_image(data)
    assert reduced.size == scaled and full.size == size
    difference = np.abs(image_to_uint8(reduced, 96).astype(int) - image_to_uint8(full, 96).astype(int))
    assert difference.mean() < 1.5 and difference.max() <= 16  # the same model input, to a grey level or two


def test_a_camera_jpeg_with_a_preview_picture_is_scaled_too() -> None:
    # many phone and camera photos carry a second picture (a preview, a gain map): Pillow opens them as MPO
    big = _photo(1600, 1200)
    data = _encode(big, "MPO", save_all=True, append_images=[big.resize((320, 240))], quality=90)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert load_image(data, min_size=96).size == (200, 150)
    assert load_image(data).size == (1600, 1200)


def test_scaled_decode_keeps_the_orientation_and_leaves_other_formats_whole() -> None:
    image = _photo(1600, 800)
    image.paste((255, 0, 0), (0, 0, 400, 800))  # the left quarter red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(_encode(image, "JPEG", exif=exif.tobytes(), quality=95), min_size=96)
    assert out.size == (100, 200)  # 1/8, then turned upright
    assert _near(out.getpixel((50, 10)), (255, 0, 0), 40)  # the left edge is now at the top
    assert load_image(_encode(image, "PNG"), min_size=96).size == (1600, 800)


def test_path_and_str_sources(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(path)
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(str(path)).size == (3, 2)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "missing.png")
    assert info.value.kind == "unreadable"
    with pytest.raises(ImageError) as info:
        load_image(tmp_path)
    assert info.value.kind == "unreadable"


# ----------------------------------------------------------------------------------------------------- failures


def _kind_of(source, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    error = info.value
    assert "\n" not in str(error) and str(error)
    return error


def test_empty(tmp_path: Path) -> None:
    assert _kind_of(b"").kind == "empty"
    (tmp_path / "empty.png").write_bytes(b"")
    error = _kind_of(tmp_path / "empty.png")
    assert error.kind == "empty" and "empty.png" in str(error)


def test_not_an_image() -> None:
    assert _kind_of(b"hello, this is a text file\n" * 10).kind == "not_image"
    assert _kind_of(b"\x00" * 100).kind == "not_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated(fmt: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    if fmt == "GIF":
        image = image.convert("P")
    data = _encode(image, fmt)
    assert _kind_of(data[: len(data) // 2]).kind == "truncated"


def test_cut_before_the_pixels_is_truncated() -> None:
    data = _encode(Image.new("RGB", (8, 8)), "PNG")
    assert _kind_of(data[:20]).kind == "truncated"


def test_truncated_stays_an_error_even_if_someone_allowed_it() -> None:
    data = _encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert _kind_of(data[: len(data) // 2]).kind == "truncated"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but whose pixel data is empty."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")


def test_huge_header_refused_fast_without_decoding() -> None:
    start = time.perf_counter()
    error = _kind_of(_png_header_only(100_000, 100_000))
    assert error.kind == "too_large"
    assert time.perf_counter() - start < 0.5


def test_max_pixels_checked_from_the_header() -> None:
    data = _png_header_only(300, 200)  # no pixel data at all: only the header can have said so
    error = _kind_of(data, max_pixels=50_000)
    assert error.kind == "too_large" and "300x200" in str(error)
    assert load_image(_encode(Image.new("RGB", (300, 200)), "PNG"), max_pixels=60_000).size == (300, 200)


def test_corrupt_pixel_data() -> None:
    data = bytearray(_encode(Image.new("RGB", (32, 32), (5, 6, 7)), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 20] = b"\xff" * 20  # garbage in the compressed stream
    assert _kind_of(bytes(data)).kind == "truncated"


def test_mode_i_holding_eight_bit_values_keeps_its_grey_levels() -> None:
    """32-bit integer pixels whose values are 0..255 (an 8-bit picture converted to I) are not taken for 16-bit
    data, which would make the picture black."""
    image = Image.fromarray(np.array([[0, 64, 128, 255]], dtype=np.uint8)).convert("I")
    out = load_image(_encode(image, "TIFF"))
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX"])
def test_formats_outside_the_documented_ones_are_not_opened(fmt: str) -> None:
    """Pillow can read many more formats, and some decode the whole file while reading its header (ICO decodes
    the PNG inside it), before the pixel limit is checked: only JPEG, PNG, WebP, BMP, GIF and TIFF are opened."""
    error = _kind_of(_encode(Image.new("RGB", (64, 64), (200, 10, 10)), fmt))
    assert error.kind == "not_image" and "JPEG, PNG, WebP, BMP, GIF or TIFF" in str(error)


def _progressive_jpeg_with_scans_repeated(copies: int) -> bytes:
    """A progressive JPEG whose last scan is repeated `copies` more times: valid, and each copy costs libjpeg a
    full pass over the image."""
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), "JPEG", progressive=True)
    last_scan = data[data.rindex(b"\xff\xda"):-2]  # up to the end-of-image marker
    return data[:-2] + last_scan * copies + data[-2:]


def test_what_follows_a_jpeg_or_sits_in_its_metadata_is_not_counted_as_scans() -> None:
    """A phone's motion photo appends a video after the picture, whose bytes may hold FF DA many times over."""
    photo = _encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    assert load_image(photo + b"ftypmp4" + b"\xff\xda\x00\x08" * 5000).size == (64, 48)
    comment = b"\xff\xfe" + (2 + 4 * 500).to_bytes(2, "big") + b"\xff\xda\x00\x08" * 500  # a COM segment
    assert load_image(photo[:2] + comment + photo[2:]).size == (64, 48)


def test_a_progressive_jpeg_is_refused_when_its_scans_would_pass_over_too_many_pixels(monkeypatch) -> None:
    import models.images

    data = _progressive_jpeg_with_scans_repeated(0)  # about 10 scans of 256x256 pixels
    monkeypatch.setattr(models.images, "MAX_JPEG_SCAN_PIXELS", 256 * 256 * 5)
    error = _kind_of(data)
    assert error.kind == "unsupported" and "scans over 256x256 pixels" in str(error)


def test_a_progressive_jpeg_decodes_and_one_of_too_many_scans_is_refused_before_decoding() -> None:
    plain = _progressive_jpeg_with_scans_repeated(0)
    assert 5 < plain.count(b"\xff\xda") < 20  # Pillow's (libjpeg's) progressive script
    assert load_image(plain).size == (256, 256)
    assert load_image(_progressive_jpeg_with_scans_repeated(80)).size == (256, 256)  # odd, but within the limit
    start = time.perf_counter()
    error = _kind_of(_progressive_jpeg_with_scans_repeated(2000))
    assert error.kind == "unsupported" and "scans" in str(error)
    assert time.perf_counter() - start < 0.5  # refused from its markers, not after 2000 passes
