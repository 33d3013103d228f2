"""Caption vocabulary of the synthetic shapes data set, and a parser that reads scene content back out of a caption.

The generator (`models.synthetic`) writes captions from the constants here and the parser reads them with the
same constants, so the two cannot drift apart. `scene_accuracy` is the task-specific metric: a caption counts as
correct only if it names every object with the right count, size, colour and shape (and, where it states a total
number of objects, the right total). BLEU/CIDEr reward fluent wording; this rewards actually seeing the scene.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES: tuple[str, ...] = ("small", "large")
MAX_OBJECTS = 4

# Some caption families say "little"/"big"; the parser maps them back to the canonical size.
SIZE_WORDS: dict[str, str] = {"small": "small", "large": "large", "little": "small", "big": "large"}
SIZE_SYNONYMS: dict[str, tuple[str, str]] = {"plain": ("small", "large"), "informal": ("little", "big")}

# "a" for one object in a group phrase; "one" may also appear (e.g. "there is one object").
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
_WORD_COUNTS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}

# Background kinds of the generator and the adjective family 5 uses for each.
BACKGROUND_WORDS: dict[str, str] = {
    "noise": "noisy",
    "stripes": "striped",
    "checkerboard": "checkered",
    "gradient": "shaded",
    "blobs": "blotchy",
}


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


_SHAPE_FORMS: dict[str, tuple[str, bool]] = {s: (s, False) for s in SHAPES} | {plural(s): (s, True) for s in SHAPES}
# Words that only make sense inside a group phrase: if one of them is left over the caption is garbled.
_CONTENT_WORDS = set(SIZE_WORDS) | set(COLOURS) | set(_SHAPE_FORMS)


@dataclass(frozen=True)
class ParsedCaption:
    objects: Counter
    total: int | None  # the "three objects" a caption may state, None when it states none


def _parse(caption: str) -> ParsedCaption | None:
    words = caption.lower().split()
    objects: Counter = Counter()
    total: int | None = None
    i = 0
    while i < len(words):
        word = words[i]
        if word in _WORD_COUNTS:
            count = _WORD_COUNTS[word]
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if nxt in ("object", "objects"):
                if (nxt == "objects") != (count > 1) or total is not None:
                    return None
                total = count
                i += 2
                continue
            if nxt in SIZE_WORDS:
                group = words[i + 1 : i + 4]
                if len(group) < 3 or group[1] not in COLOURS or group[2] not in _SHAPE_FORMS:
                    return None
                shape, is_plural = _SHAPE_FORMS[group[2]]
                if is_plural != (count > 1):
                    return None
                objects[(shape, group[1], SIZE_WORDS[group[0]])] += count
                i += 4
                continue
            if word not in ("a", "an"):  # "a"/"an" also serve as plain articles ("on a striped background")
                return None
        elif word in _CONTENT_WORDS:
            return None
        i += 1
    if not objects:
        return None
    return ParsedCaption(objects, total)


def parse_caption(caption: str) -> Counter | None:
    """The multiset of objects a caption states, as Counter{(shape, colour, size): count}; None if it does not parse.

    Group phrases are `COUNT SIZE COLOUR SHAPE` ("two big red crosses"); other words are free. A caption with a
    broken group phrase, a stray size/colour/shape word or a wrong singular/plural does not parse.
    """
    parsed = _parse(caption)
    return None if parsed is None else parsed.objects


def ground_truth(objects: Iterable[dict]) -> Counter:
    return Counter((o["shape"], o["colour"], o["size"]) for o in objects)


def scene_correct(caption: str, objects: list[dict]) -> bool:
    """True iff the caption states exactly the scene's objects (and the right total, where it states one)."""
    parsed = _parse(caption)
    if parsed is None or parsed.objects != ground_truth(objects):
        return False
    return parsed.total is None or parsed.total == len(objects)


ATTRIBUTES = ("shape", "colour", "size")


def attribute_accuracy(captions: list[str], objects_per_image: list[list[dict]]) -> dict[str, float]:
    """Per attribute, the share of captions that state it right for every object, whatever the others.

    A caption gets "count" right when it names as many objects as the scene holds, and "shape" right when the
    multiset of shapes it names is the scene's (likewise colour and size). A caption that does not parse gets
    nothing right. This tells which part of seeing the scene fails, where `scene_accuracy` needs all at once.
    """
    if len(captions) != len(objects_per_image):
        raise ValueError(f"{len(captions)} captions but {len(objects_per_image)} images")
    right = dict.fromkeys(("count", *ATTRIBUTES), 0)
    for caption, objects in zip(captions, objects_per_image):
        stated = parse_caption(caption)
        if stated is None:
            continue
        truth = ground_truth(objects)
        right["count"] += sum(stated.values()) == len(objects)
        for index, attribute in enumerate(ATTRIBUTES):
            said = Counter(kind[index] for kind in stated.elements())
            right[attribute] += said == Counter(kind[index] for kind in truth.elements())
    return {key: value / max(1, len(captions)) for key, value in right.items()}


def lone_object_shape_accuracy(captions: list[str], objects_per_image: list[list[dict]]) -> dict[str, dict]:
    """Among images that hold one object, the share of captions that name its shape, by the object's size.

    One object has no neighbour to occlude it or be confused with, so this isolates how well a shape is seen
    at each size (`{size: {"accuracy", "images"}}`, sizes without a lone object left out). A caption that
    names more or fewer than one object gets it wrong.
    """
    if len(captions) != len(objects_per_image):
        raise ValueError(f"{len(captions)} captions but {len(objects_per_image)} images")
    right: Counter = Counter()
    seen: Counter = Counter()
    for caption, objects in zip(captions, objects_per_image):
        if len(objects) != 1:
            continue
        (lone,) = objects
        seen[lone["size"]] += 1
        stated = parse_caption(caption)
        if stated is not None and sum(stated.values()) == 1:
            ((shape, _, _),) = stated.keys()
            right[lone["size"]] += shape == lone["shape"]
    return {size: {"accuracy": right[size] / seen[size], "images": seen[size]} for size in SIZES if seen[size]}


def scene_accuracy_by_count(captions: list[str], objects_per_image: list[list[dict]]) -> dict[int, dict]:
    """`scene_accuracy` among the images of each object count (`{count: {"accuracy", "images"}}`): crowded
    scenes, with small objects and occlusion, are where a model stops seeing everything."""
    if len(captions) != len(objects_per_image):
        raise ValueError(f"{len(captions)} captions but {len(objects_per_image)} images")
    right: Counter = Counter()
    seen: Counter = Counter()
    for caption, objects in zip(captions, objects_per_image):
        seen[len(objects)] += 1
        right[len(objects)] += scene_correct(caption, objects)
    return {count: {"accuracy": right[count] / seen[count], "images": seen[count]} for count in sorted(seen)}


SCENE_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(
    (shape, colour, size) for shape in SHAPES for colour in COLOURS for size in SIZES
)
"""Every kind of object a scene can hold, in a fixed order: the labels of the encoder's pre-training probe."""


def scene_targets(objects: list[dict]) -> tuple[list[float], int]:
    """(presence of each `SCENE_TRIPLES` kind as 0/1, the object count) of one ground-truth scene."""
    present = set(ground_truth(objects))
    return [1.0 if kind in present else 0.0 for kind in SCENE_TRIPLES], len(objects)


def scene_accuracy(captions: list[str], objects_per_image: list[list[dict]]) -> float:
    """Fraction of captions that are `scene_correct` for their image."""
    if len(captions) != len(objects_per_image):
        raise ValueError(f"{len(captions)} captions but {len(objects_per_image)} images")
    if not captions:
        return 0.0
    return sum(scene_correct(c, o) for c, o in zip(captions, objects_per_image)) / len(captions)
