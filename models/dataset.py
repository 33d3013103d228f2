"""One loader for Karpathy-split caption files: ours (`capeen data`) and the real COCO / Flickr30k ones.

The real files (`dataset_coco.json`, `dataset_flickr30k.json`) list images with "filename", optional "filepath"
(COCO: "train2014"/"val2014"), "split" (train/val/test, COCO also "restval") and "sentences" with "tokens" and
"raw". Ours has the same shape plus "objects" per image. A malformed file is reported as one line that names the
file and the entry, so a user can fix it without reading a traceback.
"""

from __future__ import annotations

import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.scene import COLOURS, SHAPES, SIZES

# The pixel cache that models.training_data keeps beside a data set's JSON: one file per split and image size,
# named by its caption file and a hash of what the pixels depend on (a temporary one also by the pid of the
# process writing it; caches of before the caption file was named have no name key).
PIXEL_CACHE_FOLDER = "cache"
PIXEL_CACHE_FILE = re.compile(r"\w+-\d+px-(?:[0-9a-f]{8}-)?[0-9a-f]{12}(\.\d+\.tmp)?\.npy")
MAX_CAPTION_FILE_BYTES = 4 * 2**30  # read whole into memory; COCO's Karpathy file is 0.15 GiB

SPLITS: tuple[str, ...] = ("train", "val", "test", "restval")
# Letters and digits, keeping inner apostrophes ("man's"): Karpathy's tokens have no punctuation.
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


class DatasetError(ValueError):
    """A caption file that cannot be used; the message is one line naming the file and the entry."""


@dataclass
class CaptionRecord:
    image_path: Path
    split: str
    captions: list[list[str]]  # token lists, lowercase
    raw: list[str]
    objects: list[dict] | None  # ground-truth scene of synthetic images, None for real data sets
    image_id: int | str
    empty_sentences: int = 0  # sentences of the entry with no word, left out of `captions` and `raw`


def tokenize(text: str) -> list[str]:
    """Lowercase, drop punctuation, split: how captions without "tokens" (and model output) are compared."""
    return _TOKEN.findall(text.lower())


def _read_json(path: Path) -> Any:
    try:
        # /dev/zero, a FIFO or a mistaken 100 GB file would be read into memory whole
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise DatasetError(f"{path}: not a regular file")
        if info.st_size > MAX_CAPTION_FILE_BYTES:
            raise DatasetError(f"{path}: {info.st_size / 2**30:.1f} GiB, more than a caption file is read "
                               f"({MAX_CAPTION_FILE_BYTES // 2**30} GiB)")
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not an error
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to be a caption file") from None


def _sentence(sentence: Any, where: str) -> tuple[list[str], str]:
    """(tokens, raw) of one sentence entry."""
    if not isinstance(sentence, dict):
        raise DatasetError(f"{where}: expected an object with \"tokens\" or \"raw\"")
    raw = sentence.get("raw")
    if raw is not None and not isinstance(raw, str):
        raise DatasetError(f"{where}: \"raw\" is not a string")
    tokens = sentence.get("tokens")
    if tokens is None:
        if raw is None:
            raise DatasetError(f"{where}: missing \"tokens\" and \"raw\"")
        tokens = tokenize(raw)
    elif not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise DatasetError(f"{where}: \"tokens\" is not a list of strings")
    tokens = [t.lower() for t in tokens if t.strip()]
    return tokens, raw if raw is not None else " ".join(tokens)


def _string_field(entry: dict, key: str, where: str, required: bool) -> str | None:
    value = entry.get(key)
    if value is None:
        if required:
            raise DatasetError(f"{where}: missing \"{key}\"")
        return None
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: \"{key}\" is not a non-empty string")
    if "\0" in value:  # no file name holds one: the OS would refuse it without naming the entry
        raise DatasetError(f"{where}: \"{key}\" holds a NUL character")
    return value


_OBJECT_FIELDS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}


def _scene_object(obj: dict, where: str) -> None:
    """One ground-truth object of a synthetic scene: what scene accuracy and stage encoder read from it."""
    for key, allowed in _OBJECT_FIELDS.items():
        value = obj.get(key)
        if value is None:
            raise DatasetError(f"{where}: missing \"{key}\"")
        if value not in allowed:
            raise DatasetError(f"{where}: unknown {key} {value!r} (expected one of {', '.join(allowed)})")


def _record(entry: Any, where: str, image_root: Path, keep_restval: bool) -> CaptionRecord:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    filename = _string_field(entry, "filename", where, required=True)
    filepath = _string_field(entry, "filepath", where, required=False)
    split = _string_field(entry, "split", where, required=True)
    if split not in SPLITS:
        raise DatasetError(f"{where}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    sentences = entry.get("sentences")
    if sentences is None:
        raise DatasetError(f"{where}: missing \"sentences\"")
    if not isinstance(sentences, list) or not sentences:
        raise DatasetError(f"{where}: \"sentences\" is not a non-empty list")
    pairs = [_sentence(s, f"{where}.sentences[{k}]") for k, s in enumerate(sentences)]
    pairs = [(tokens, raw) for tokens, raw in pairs if tokens]  # an empty caption teaches nothing
    if not pairs:
        raise DatasetError(f"{where}: every sentence is empty")
    objects = entry.get("objects")
    if objects is not None and not (isinstance(objects, list) and all(isinstance(o, dict) for o in objects)):
        raise DatasetError(f"{where}: \"objects\" is not a list of objects")
    for k, obj in enumerate(objects or []):
        _scene_object(obj, f"{where}.objects[{k}]")
    # COCO evaluation keys on the COCO id; elsewhere the running image id is all there is.
    image_id = entry.get("cocoid", entry.get("imgid", where))
    return CaptionRecord(
        image_path=image_root / filepath / filename if filepath else image_root / filename,
        split="train" if split == "restval" and not keep_restval else split,
        captions=[tokens for tokens, _ in pairs],
        raw=[raw for _, raw in pairs],
        objects=objects,
        image_id=image_id,
        empty_sentences=len(sentences) - len(pairs),
    )


def load_karpathy(
    json_path: str | Path, image_root: str | Path | None = None, keep_restval: bool = False
) -> list[CaptionRecord]:
    """Read a Karpathy-style caption file (ours, COCO or Flickr30k).

    Image paths are `image_root / filepath / filename` ("filepath" is optional); `image_root` defaults to the
    JSON file's directory. "restval" images count as "train" unless `keep_restval`. Raises DatasetError.
    """
    path = Path(json_path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with \"images\", got {type(data).__name__}")
    images = data.get("images")
    if not isinstance(images, list):
        raise DatasetError(f"{path}: missing \"images\" list")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    return [_record(entry, f"{path}: images[{i}]", root, keep_restval) for i, entry in enumerate(images)]


def records_for_split(records: list[CaptionRecord], split: str) -> list[CaptionRecord]:
    """The records of one split ("train", "val", "test"; "restval" only exists if loaded with keep_restval)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return [r for r in records if r.split == split]
