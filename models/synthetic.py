"""Synthetic captioning data: scenes of 1-4 coloured shapes on cluttered backgrounds, with 5 captions per image.

Why synthetic: the captions are exactly checkable (`models.scene.scene_accuracy`), so a captioner and its early
exits can be judged on whether they *see* the scene, not only on n-gram overlap. Difficulty varies per image
(object count, object size, mild occlusion, background clutter and contrast) so early exits have easy and hard
cases to tell apart.

Everything is deterministic from the seed: image `(split, index)` draws from its own generator
`default_rng([seed, split_id, index])`, so the output is byte-identical whatever the number of worker processes.
`capeen data` (see `cli_main`) writes `images/{split}_{index:06d}.png` and a Karpathy-style `dataset.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from capeen.errors import UserError
from models.dataset import PIXEL_CACHE_FILE, PIXEL_CACHE_FOLDER
from models.interrupts import signals_deferred
from models.scene import (
    BACKGROUND_WORDS,
    COLOURS,
    COUNT_WORDS,
    MAX_OBJECTS,
    NUMBER_WORDS,
    SHAPES,
    SIZE_SYNONYMS,
    SIZES,
    plural,
)

DATASET_NAME = "capeen-shapes"
SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096  # models see 96 px; each worker draws a whole image in memory, 4 bytes a pixel
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_WORDS)

# Pixel constants are given for a 96 px image and scaled with the image size.
_REFERENCE_SIZE = 96
_RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (8.0, 10.0), "large": (15.0, 18.0)}
_BASE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 55),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 35),
    "purple": (140, 55, 185),
    "orange": (245, 140, 25),
    "white": (245, 245, 245),
    "black": (12, 12, 12),
}
_COLOUR_JITTER = 15
_DUPLICATE_PROBABILITY = 0.3  # of multi-object scenes, so that captions contain counts ("two small red circles")
_MAX_OVERLAP = 0.2  # of the smaller object's area, pairwise
_MAX_HIDDEN = 0.25  # of an object's area, by all the objects drawn over it
_SUPERSAMPLE = 4  # shapes are drawn this much larger and box-filtered down: anti-aliased edges
_BACKGROUND_CLIP = (50.0, 200.0)  # medium luminance: white and black objects both stand out
_IMAGE_NAME = re.compile(r"(train|val|test)_\d{6}\.png")
_STAGING_PREFIX = ".capeen-data-"  # a data set being drawn, inside the output directory


# ----------------------------------------------------------------------------------------------------- drawing


def _shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) whose extent is 2r (circles are drawn as ellipses instead)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        t = 0.36 * r  # half the bar width: thick enough to stay a plus sign at 16 px
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _shape_alpha(shape: str, r: float, fx: float, fy: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) of a shape on a small square patch, centred at (c + fx, c + fy).

    Drawing once per object and translating the patch by whole pixels makes rejection sampling cheap.
    """
    side = math.ceil(2 * r) + 3
    c = side / 2 - 0.5  # patch centre in pixel-centre coordinates
    s = _SUPERSAMPLE
    canvas = Image.new("L", (side * s, side * s), 0)
    draw = ImageDraw.Draw(canvas)
    # Pixel (i, j) covers [i*s, (i+1)*s) on the canvas, so its centre i+0.5 maps to (i + 0.5) * s.
    cx, cy, rr = (c + fx + 0.5) * s, (c + fy + 0.5) * s, r * s
    if shape == "circle":
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
    else:
        draw.polygon(_shape_outline(shape, cx, cy, rr), fill=255)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with blobs about size/cells px wide (low-res noise, bilinearly upscaled)."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    big = Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(big) / 1.5, -1.0, 1.0)


def _rotated_coordinates(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx * math.cos(angle) + yy * math.sin(angle), -xx * math.sin(angle) + yy * math.cos(angle)


def _blob_pattern(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 128)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(4, 20, 2) * scale
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(rng.integers(0, 256)))
    for _ in range(int(rng.integers(2, 7))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line((x0, y0, x1, y1), fill=int(rng.integers(0, 256)), width=max(1, round(rng.uniform(1, 3) * scale)))
    return (np.asarray(canvas, dtype=np.float32) - 128.0) / 128.0


def _pattern(kind: str, rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A texture in [-1, 1] of the given kind."""
    if kind == "noise":
        return _smooth_noise(rng, size, int(rng.integers(4, 24)))
    if kind == "stripes":
        u, _ = _rotated_coordinates(rng, size)
        period = rng.uniform(5, 16) * scale
        return np.tanh(3 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi)))
    if kind == "checkerboard":
        u, v = _rotated_coordinates(rng, size)
        cell = rng.uniform(5, 14) * scale
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2) * 2.0 - 1.0
    if kind == "gradient":
        u, _ = _rotated_coordinates(rng, size)
        return (u - u.mean()) / max(float(np.abs(u - u.mean()).max()), 1e-6)
    if kind == "blobs":
        return _blob_pattern(rng, size, scale)
    raise ValueError(f"unknown background {kind!r}")


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """Medium-luminance, desaturated texture (float RGB, size x size x 3) and its kind."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pattern = _pattern(kind, rng, size, size / _REFERENCE_SIZE)
    luminance = rng.uniform(85, 165)
    contrast = rng.uniform(10, 35) * (1.5 if kind == "gradient" else 1.0)  # varies the difficulty
    tint = rng.uniform(-12, 12, 3)  # a faint colour cast, kept small so no background looks like an object colour
    tone_tint = rng.uniform(-8, 8, 3)  # the two tones of a pattern differ slightly in hue too
    rgb = luminance + tint + pattern[..., None] * (contrast + tone_tint)
    rgb += rng.normal(0, rng.uniform(2, 7), (size, size, 1))  # grain
    return np.clip(rgb, *_BACKGROUND_CLIP).astype(np.float32), kind


def _object_specs(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    specs = [
        (SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))], SIZES[rng.integers(len(SIZES))])
        for _ in range(n)
    ]
    if n > 1 and rng.random() < _DUPLICATE_PROBABILITY:
        source, target = rng.choice(n, size=2, replace=False)
        specs[int(target)] = specs[int(source)]
    return specs


class _Placed:
    """An object on the canvas: its patch, where the patch sits, and how many of its pixels are still visible."""

    def __init__(self, alpha: np.ndarray, left: int, top: int) -> None:
        self.alpha, self.left, self.top = alpha, left, top
        self.solid = alpha > 0.5
        self.area = int(self.solid.sum())
        self.hidden = 0

    def overlap(self, other: _Placed) -> int:
        """Solid pixels the two patches share."""
        x0, y0 = max(self.left, other.left), max(self.top, other.top)
        x1 = min(self.left + self.solid.shape[1], other.left + other.solid.shape[1])
        y1 = min(self.top + self.solid.shape[0], other.top + other.solid.shape[0])
        if x0 >= x1 or y0 >= y1:
            return 0
        a = self.solid[y0 - self.top : y1 - self.top, x0 - self.left : x1 - self.left]
        b = other.solid[y0 - other.top : y1 - other.top, x0 - other.left : x1 - other.left]
        return int((a & b).sum())


def _try_place(rng: np.random.Generator, alpha: np.ndarray, placed: list[_Placed], size: int) -> _Placed | None:
    """Rejection-sample a position where the new object hides little of those already drawn (it goes on top)."""
    side = alpha.shape[0]
    for _ in range(200):
        left, top = (int(v) for v in rng.integers(0, size - side + 1, 2))
        candidate = _Placed(alpha, left, top)
        overlaps = [candidate.overlap(p) for p in placed]
        if all(
            o <= _MAX_OVERLAP * min(p.area, candidate.area) and p.hidden + o <= _MAX_HIDDEN * p.area
            for o, p in zip(overlaps, placed)
        ):
            for o, p in zip(overlaps, placed):
                p.hidden += o
            return candidate
    return None


def _layout(rng: np.random.Generator, size: int) -> tuple[list[dict], list[_Placed]]:
    scale = size / _REFERENCE_SIZE
    specs = _object_specs(rng)
    while True:  # a crowded draw can leave no room for the last object: lay the whole scene out again
        objects: list[dict] = []
        placed: list[_Placed] = []
        for shape, colour, size_word in specs:
            r = rng.uniform(*_RADIUS_RANGE[size_word]) * scale
            fx, fy = rng.uniform(-0.5, 0.5, 2)
            alpha = _shape_alpha(shape, r, fx, fy)
            where = _try_place(rng, alpha, placed, size)
            if where is None:
                break
            c = alpha.shape[0] / 2 - 0.5
            # Continuous coordinates (pixel (i, j) spans [i, i+1) x [j, j+1)): the centre is in pixel (int(x), int(y)).
            objects.append({
                "shape": shape, "colour": colour, "size": size_word,
                "x": round(where.left + c + fx + 0.5, 2), "y": round(where.top + c + fy + 0.5, 2),
                "radius": round(r, 2),
            })  # fmt: skip
            placed.append(where)
        else:
            return objects, placed


def _paint(canvas: np.ndarray, objects: list[dict], placed: list[_Placed], rng: np.random.Generator) -> None:
    for obj, p in zip(objects, placed):
        rgb = np.clip(np.array(_BASE_RGB[obj["colour"]]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
        h, w = p.alpha.shape
        region = canvas[p.top : p.top + h, p.left : p.left + w]
        a = p.alpha[..., None]
        region[:] = region * (1 - a) + rgb.astype(np.float32) * a


def render_scene(rng: np.random.Generator, image_size: int = _REFERENCE_SIZE) -> tuple[Image.Image, list[dict]]:
    """Draw one scene; returns the RGB image and its objects (x, y = centre in pixels, radius = half extent).

    The background kind is in `image.info["background"]` (captions name it).
    """
    canvas, kind = _background(rng, image_size)
    objects, placed = _layout(rng, image_size)
    _paint(canvas, objects, placed, rng)
    image = Image.fromarray(np.round(canvas).astype(np.uint8))
    image.info["background"] = kind
    return image, objects


# ---------------------------------------------------------------------------------------------------- captions


def _groups(objects: list[dict]) -> list[list[dict]]:
    """Objects with the same (shape, colour, size), groups in left-to-right order of their leftmost member."""
    by_kind: dict[tuple[str, str, str], list[dict]] = {}
    for obj in objects:
        by_kind.setdefault((obj["shape"], obj["colour"], obj["size"]), []).append(obj)
    return sorted(by_kind.values(), key=lambda g: min((o["x"], o["y"]) for o in g))


def _phrase(group: list[dict], size_words: tuple[str, str]) -> str:
    first, n = group[0], len(group)
    size_word = size_words[SIZES.index(first["size"])]
    shape = first["shape"] if n == 1 else plural(first["shape"])
    return f"{COUNT_WORDS[n]} {size_word} {first['colour']} {shape}"


def _listed(phrases: list[str]) -> str:
    """'A', 'A and B', 'A B and C': no commas, every group phrase starts with its count word anyway."""
    return phrases[0] if len(phrases) == 1 else " ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation(subject: list[dict], reference: list[dict]) -> str:
    """Where `subject` is relative to `reference`, along the dominant axis of the displacement of their centres."""
    dx = np.mean([o["x"] for o in subject]) - np.mean([o["x"] for o in reference])
    dy = np.mean([o["y"] for o in subject]) - np.mean([o["y"] for o in reference])
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def _verb(group: list[dict]) -> str:
    return "is" if len(group) == 1 else "are"


def _relational_left_to_right(groups: list[list[dict]], phrases: list[str]) -> str:
    if len(groups) == 1:
        return f"{phrases[0]} on {'its' if len(groups[0]) == 1 else 'their'} own"
    return f"{phrases[0]} to the left of " + " and ".join(phrases[1:])


def _with_total(objects: list[dict], phrases: list[str], rng: np.random.Generator) -> str:
    n = len(objects)
    noun = "object" if n == 1 else "objects"
    if rng.random() < 0.5:
        head = f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun}"
    else:
        head = f"{NUMBER_WORDS[n]} {noun} in total"
    return f"{head} {_listed(phrases)}"


def _ordered(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return f"only {phrases[0]}"
    return "from left to right " + " then ".join(phrases)


def _relational_chain(groups: list[list[dict]], phrases: list[str]) -> str:
    """Right to left, each group placed relative to the next: 'X is above Y which are left of Z'."""
    groups, phrases = groups[::-1], phrases[::-1]
    if len(groups) == 1:
        return f"{phrases[0]} {_verb(groups[0])} the only {'object' if len(groups[0]) == 1 else 'objects'}"
    parts = [phrases[0]]
    for k in range(len(groups) - 1):
        joiner = "" if k == 0 else "which "
        parts.append(f"{joiner}{_verb(groups[k])} {_relation(groups[k], groups[k + 1])} {phrases[k + 1]}")
    return " ".join(parts)


def _with_background(phrases: list[str], background: str, rng: np.random.Generator) -> str:
    frame = "an image with" if rng.random() < 0.5 else "a picture of"
    return f"{frame} {_listed(phrases)} on a {BACKGROUND_WORDS[background]} background"


def captions_for(objects: list[dict], background: str, rng: np.random.Generator) -> list[str]:
    """Five captions of one scene, one per wording family, each naming every group's count, size, colour, shape."""
    groups = _groups(objects)
    plain = [_phrase(g, SIZE_SYNONYMS["plain"]) for g in groups]
    informal = [_phrase(g, SIZE_SYNONYMS["informal"]) for g in groups]
    return [
        _relational_left_to_right(groups, plain),
        _with_total(objects, informal, rng),
        _ordered(plain),
        _relational_chain(groups, informal),
        _with_background(plain, background, rng),
    ]


# ----------------------------------------------------------------------------------------------------- data set


def image_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.png"


def draw_example(seed: int, split: str, index: int, image_size: int) -> tuple[Image.Image, list[dict], str, list[str]]:
    """Image, objects, background kind and captions of example `index` of `split`: a pure function of its args."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    image, objects = render_scene(rng, image_size)
    background = image.info["background"]
    return image, objects, background, captions_for(objects, background, rng)


def _draw_and_save(task: tuple[int, str, int, int, str]) -> tuple[list[dict], str, list[str]]:
    seed, split, index, image_size, images_dir = task
    image, objects, background, captions = draw_example(seed, split, index, image_size)
    image.save(os.path.join(images_dir, image_name(split, index)), format="PNG")
    return objects, background, captions


def _results(tasks: list[tuple], workers: int) -> Iterator[tuple[list[dict], str, list[str]]]:
    if workers <= 1:
        yield from map(_draw_and_save, tasks)
        return
    chunk = max(1, min(256, len(tasks) // (workers * 8)))
    # workers ignore Ctrl-C: the parent stops them, and each would print its own KeyboardInterrupt traceback
    with multiprocessing.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        yield from pool.imap(_draw_and_save, tasks, chunksize=chunk)


def _check_arguments(counts: dict[str, int], seed: int, image_size: int, workers: int) -> None:
    for split, n in counts.items():
        if n < 0:
            raise UserError(f"--n-{split} must be >= 0, got {n}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must lie in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0: one per core), got {workers}")


def _is_ours(entry: Path) -> bool:
    """Whether `entry` in an output directory can only have been written by this generator."""
    if entry.name == "dataset.json.tmp":
        return True
    if entry.name.startswith(_STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
        return True  # the staging folder of a generation that was killed before it could remove it
    if entry.name == "images" and entry.is_dir():
        return all(_IMAGE_NAME.fullmatch(p.name) for p in entry.iterdir())
    if entry.name == PIXEL_CACHE_FOLDER and entry.is_dir() and not entry.is_symlink():  # what a command decoded
        return all(PIXEL_CACHE_FILE.fullmatch(p.name) for p in entry.iterdir())
    if entry.name == "dataset.json" and entry.is_file():
        try:
            with entry.open(encoding="utf-8") as f:
                head = f.read(200)  # the name is the first key: no need to parse megabytes
        except OSError:
            return False
        return head.startswith(f'{{"dataset":"{DATASET_NAME}"')
    return False


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    foreign = next((entry for entry in sorted(out.iterdir()) if not _is_ours(entry)), None) if out.is_dir() else None
    if foreign is not None:
        raise UserError(f"{out} is not empty and holds something other than a {DATASET_NAME} data set "
                        f"({foreign.name}): give an empty or new folder")


def _entry(imgid: int, sentid: int, split: str, index: int, result: tuple[list[dict], str, list[str]]) -> dict:
    objects, background, captions = result
    sentences = [
        {"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": sentid + k} for k, c in enumerate(captions)
    ]
    return {
        "filepath": "images",
        "filename": image_name(split, index),
        "imgid": imgid,
        "split": split,
        "sentids": [s["sentid"] for s in sentences],
        "sentences": sentences,
        "objects": objects,
        "background": background,
    }


def _write_dataset(directory: Path, counts: dict[str, int], seed: int, image_size: int, workers: int) -> None:
    """Draw every image into `directory/images` and write `directory/dataset.json` (an empty directory)."""
    images_dir = directory / "images"
    images_dir.mkdir()
    tasks = [(seed, split, i, image_size, str(images_dir)) for split, n in counts.items() for i in range(n)]
    workers = workers or os.cpu_count() or 1
    entries = []
    progress = tqdm(_results(tasks, min(workers, len(tasks))), total=len(tasks), desc="drawing", unit="img")
    for imgid, (task, result) in enumerate(zip(tasks, progress)):
        entries.append(_entry(imgid, 5 * imgid, task[1], task[2], result))
    # "dataset" first: _is_ours recognises the file from its first bytes.
    document = {"dataset": DATASET_NAME, "seed": seed, "image_size": image_size, "images": entries}
    (directory / "dataset.json").write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")


def _swap_in(staging: Path, out: Path) -> None:
    """Move the complete data set in `staging` into `out`, and the one `out` held into `staging/old`.

    The old dataset.json goes first and the new one comes last, so even a kill mid-way never leaves a
    dataset.json beside images it does not describe; Ctrl-C and SIGTERM are held until the moves are done.
    """
    old = staging / "old"
    old.mkdir()
    moved: list[str] = []
    with signals_deferred():
        try:
            # the old pixel cache too: its names no longer match the new data set, so it would only take room
            for name in ("dataset.json", "dataset.json.tmp", "images", PIXEL_CACHE_FOLDER):
                if (out / name).exists() or (out / name).is_symlink():
                    os.replace(out / name, old / name)
                    moved.append(name)
            os.replace(staging / "images", out / "images")
            os.replace(staging / "dataset.json", out / "dataset.json")
        except OSError:  # put the earlier data set back as it was
            with contextlib.suppress(OSError):
                if not (staging / "images").exists():
                    os.replace(out / "images", staging / "images")
            for name in reversed(moved):
                with contextlib.suppress(OSError):
                    os.replace(old / name, out / name)
            raise


def generate_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    image_size: int = _REFERENCE_SIZE,
    workers: int = 0,
) -> Path:
    """Write `out_dir/images/*.png` and `out_dir/dataset.json` (Karpathy format plus objects); returns the JSON path.

    Refuses (UserError) bad counts/sizes and an output directory holding anything but an earlier data set of ours,
    which is replaced (images it had beyond the new counts are gone). The new data set is drawn into a staging
    folder inside `out_dir` and moved into place only once complete: a generation that fails or is interrupted
    leaves the earlier data set as it was (it needs the disk space of both while it runs).
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_arguments(counts, seed, image_size, workers)
    out = Path(out_dir)
    _check_output(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.iterdir():  # staging folders of generations that were killed
            if leftover.name.startswith(_STAGING_PREFIX) and leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=_STAGING_PREFIX))
    except OSError as exc:
        raise UserError(f"{out}: cannot write the data set there: {exc.strerror or exc}") from None
    try:
        _write_dataset(staging, counts, seed, image_size, workers)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)  # now the earlier data set
    return out / "dataset.json"


def cli_main(args: argparse.Namespace) -> int:
    """`capeen data`: generate the synthetic data set."""
    json_path = generate_dataset(
        args.out, args.n_train, args.n_val, args.n_test, args.seed, image_size=args.image_size, workers=args.workers
    )
    n = args.n_train + args.n_val + args.n_test
    print(f"wrote {n} images and {json_path}")
    return 0
