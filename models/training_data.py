"""In-memory training tensors: every image of a split decoded once, every caption encoded once.

Decoding thousands of PNGs per epoch would cost more than the model itself on a 2-core CPU, so a split's
pixels are cached as one uint8 `.npy` file (loaded with allow_pickle=False) in `cache/` next to the dataset
JSON. The cache's name holds a hash of the JSON and of every image's path, size and modification time, so
an edited, replaced or deleted image, or another caption file, is never served stale pixels. Images are
decoded exactly as `capeen caption` and the service decode them (models.images.load_image), so that a model
is trained and evaluated on the pixels it will be served.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from capeen.errors import first_line
from models.dataset import PIXEL_CACHE_FOLDER, DatasetError, load_karpathy, records_for_split
from models.images import ImageError, load_image
from models.preprocess import image_to_uint8
from models.tokenizer import SPECIALS, UNK, WordTokenizer


@dataclass
class SplitTensors:
    pixels: torch.Tensor  # (N, 3, S, S) uint8
    captions: torch.Tensor  # (N, C, L) token ids, PAD-padded; C = most captions of any image
    caption_counts: torch.Tensor  # (N,) how many of the C rows are real captions
    records: list
    pad_id: int

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def sample(self, index: torch.Tensor, per_image: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels of `index` and `per_image` captions of each (without replacement where there are enough)."""
        counts = self.caption_counts[index]
        # random keys; the real captions' keys sort first, so the first `per_image` are a random subset
        keys = torch.rand(len(index), self.captions.shape[1], generator=generator)
        keys[torch.arange(self.captions.shape[1]).expand(len(index), -1) >= counts[:, None]] = 2.0
        order = keys.argsort(dim=1)
        repeats = torch.arange(per_image) % counts[:, None]  # cycle when an image has fewer captions
        chosen = order.gather(1, repeats)
        captions = self.captions[index[:, None], chosen].reshape(len(index) * per_image, -1)
        longest = int((captions != self.pad_id).sum(dim=1).max())
        return self.pixels[index], captions[:, :longest]  # no compute spent on all-pad columns


def resolve_dataset_json(path: Path) -> Path:
    """The caption file: `path`, or `path/dataset.json` for a folder made by `capeen data`."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "dataset.json").exists():
        others = sorted(p.name for p in path.glob("*.json"))
        if others:  # a COCO or Flickr30k folder: dataset_coco.json, dataset_flickr30k.json
            raise DatasetError(f"{path}: no dataset.json; give the caption file itself, e.g. --data "
                               f"{path / others[0]}")
    return path / "dataset.json"


def _read_cache(cache: Path, shape: tuple[int, ...], first: int | None = None) -> np.ndarray | None:
    """The cached pixels, or None when the file cannot be used. With `first`, only the first images, read
    through a memory map (a quick look at COCO's train split need not load 3 GB), and None says nothing;
    otherwise None comes with a one-line note on stderr, and the caller rebuilds the file."""
    try:
        pixels = np.load(cache, allow_pickle=False, mmap_mode=None if first is None else "r")
        if pixels.dtype != np.uint8 or pixels.shape != shape:
            raise ValueError(f"holds {pixels.dtype} {tuple(pixels.shape)}, expected uint8 {shape}")
        return pixels if first is None else np.array(pixels[:first])
    except (OSError, ValueError, EOFError) as exc:
        if first is None:
            print(f"capeen: pixel cache {cache} cannot be read ({first_line(exc)}); rebuilding it",
                  file=sys.stderr)
        return None


def _decode(record, size: int) -> np.ndarray:
    """One image as uint8 (3, size, size); a missing, truncated or corrupt file is a DatasetError naming it."""
    try:
        return image_to_uint8(load_image(record.image_path, min_size=size), size)  # as served: JPEGs scaled
    except ImageError as exc:
        raise DatasetError(str(exc)) from None


# bumped whenever decoding changes, so that caches of other pixels are not reused (2: models.images.load_image;
# 3: JPEGs decoded at a reduced scale; 4: MPO photos too)
_CACHE_FORMAT = 4


def _cache_path(json_path: Path, split: str, size: int, records: list) -> Path:
    """Where this split's pixels are cached, named by what they depend on. Raises a DatasetError that lists
    the images that are missing, all of them at once, before anything is decoded."""
    digest = hashlib.sha1(f"{_CACHE_FORMAT}\n".encode() + json_path.read_bytes())
    missing = []
    for record in records:
        try:
            stat = os.stat(record.image_path)
        except FileNotFoundError:
            missing.append(record.image_path)
            continue
        except OSError as exc:
            raise DatasetError(f"{record.image_path}: cannot read: {exc.strerror or exc}") from None
        name = os.path.relpath(record.image_path, json_path.parent)  # the data set may move, cache and all
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if missing:
        shown = ", ".join(str(path) for path in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DatasetError(f"{len(missing)} of the {len(records)} images of split {split!r} not found: {shown}")
    name = f"{split}-{size}px-{_source_key(json_path)}-{digest.hexdigest()[:12]}.npy"
    return json_path.parent / PIXEL_CACHE_FOLDER / name


def _source_key(json_path: Path) -> str:
    """Which caption file of its folder a cache belongs to: two in one folder (COCO's and a subset of it) keep
    a cache each instead of replacing each other's as stale."""
    return hashlib.sha1(json_path.name.encode()).hexdigest()[:8]


def _decode_all(records: list, size: int, split: str) -> np.ndarray:
    pixels = np.empty((len(records), 3, size, size), dtype=np.uint8)
    for i, record in enumerate(tqdm(records, desc=f"decoding {split} images", unit="img", leave=False)):
        pixels[i] = _decode(record, size)
    return pixels


def pixel_cache(json_path: Path, split: str, size: int, records: list, cache: Path) -> np.ndarray:
    unreadable = False
    if cache.exists():
        cached = _read_cache(cache, (len(records), 3, size, size))
        if cached is not None:
            return cached
        unreadable = True
    pixels = _decode_all(records, size, split)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")  # one per process: concurrent runs never share it
    try:
        cache.parent.mkdir(exist_ok=True)
        np.save(tmp, pixels)
        tmp.replace(cache)
        _remove_stale_caches(cache, split, size)
    except OSError:
        # a read-only data set (a shared COCO mount): go on without the cache, decoding the images each run
        if unreadable:
            print(f"capeen: could not rebuild pixel cache {cache}; delete it, or every run decodes the images again",
                  file=sys.stderr)
    finally:  # a failed write, or Ctrl-C during it: no half-written temporary left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return pixels


def _remove_stale_caches(cache: Path, split: str, size: int) -> None:
    """Earlier versions of the split's pixels from the same caption file, caches named before they named their
    caption file, and temporaries whose writer is gone (killed while it wrote: a SIGKILL or an out-of-memory kill
    runs no clean-up)."""
    source = cache.name.split("-")[2]
    unnamed = f"{split}-{size}px-{'[0-9a-f]' * 12}"
    stale_ones = itertools.chain(cache.parent.glob(f"{split}-{size}px-{source}-*.npy"),
                                 cache.parent.glob(f"{unnamed}.npy"), cache.parent.glob(f"{unnamed}.*.tmp.npy"))
    for stale in stale_ones:
        if stale == cache:
            continue
        if stale.name.endswith(".tmp.npy"):
            writer = stale.name.split(".")[-3]
            if writer.isdigit() and _process_alive(int(writer)):
                continue  # another run is writing it now
        stale.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def split_pixels(dataset: Path | str, split: str, image_size: int, limit: int | None = None,
                 image_root: Path | str | None = None) -> tuple[list, torch.Tensor]:
    """The records of one split (the first `limit`) and their pixels, uint8 (N, 3, S, S), cached on disk.
    `image_root`: the folder the caption file's image paths start from (default: the caption file's)."""
    json_path = resolve_dataset_json(dataset)
    records = records_for_split(load_karpathy(json_path, image_root, keep_restval=split == "restval"), split)
    if not records:
        raise ValueError(f"{json_path}: no images in split {split!r}")
    empty = sum(r.empty_sentences for r in records)
    if empty:
        print(f"capeen: split {split!r} of {json_path} has {empty} empty sentence(s) (no word), left out of the "
              f"captions and references", file=sys.stderr)
    repeated = [path for path, count in Counter(r.image_path for r in records).items() if count > 1]
    if repeated:
        print(f"capeen: split {split!r} of {json_path} lists {len(repeated)} image(s) more than once "
              f"(first: {repeated[0]}); each listing counts as an image", file=sys.stderr)
    cache = None
    if limit is not None and limit < len(records):
        with contextlib.suppress(DatasetError):  # an image missing further on need not stop a look at the first few
            cache = _cache_path(json_path, split, image_size, records)
        if cache is not None and cache.exists():
            few = _read_cache(cache, (len(records), 3, image_size, image_size), first=limit)
            if few is not None:
                return records[:limit], torch.from_numpy(few)
        else:
            # a quick look at a few images need not decode the whole split (5000 for COCO's test) to cache it
            records = records[:limit]
            return records, torch.from_numpy(_decode_all(records, image_size, split))
    cache = cache or _cache_path(json_path, split, image_size, records)
    pixels = torch.from_numpy(pixel_cache(json_path, split, image_size, records, cache))
    if limit is not None:
        records, pixels = records[:limit], pixels[:limit]
    return records, pixels


def load_split(json_path: Path, split: str, tokenizer: WordTokenizer, image_size: int, max_len: int,
               limit: int | None = None, image_root: Path | None = None) -> SplitTensors:
    records, pixels = split_pixels(json_path, split, image_size, limit, image_root)
    most = max(len(r.captions) for r in records)
    captions = torch.full((len(records), most, max_len), tokenizer.pad_id, dtype=torch.long)
    counts = torch.zeros(len(records), dtype=torch.long)
    for i, record in enumerate(records):
        counts[i] = len(record.captions)
        for j, words in enumerate(record.captions):
            ids = tokenizer.encode(words, max_len=max_len)
            captions[i, j, : len(ids)] = torch.tensor(ids)
    _note_what_the_model_cannot_learn(records, split, tokenizer, max_len)
    return SplitTensors(pixels=pixels, captions=captions, caption_counts=counts, records=records,
                        pad_id=tokenizer.pad_id)


def _note_what_the_model_cannot_learn(records: list, split: str, tokenizer: WordTokenizer, max_len: int) -> None:
    """One line each on stderr: captions cut to the model's length, and words outside its vocabulary (many of
    them when `--init` brings a checkpoint trained on other captions)."""
    captions = [words for record in records for words in record.captions]
    longest = max_len - 2  # the begin and end tokens take two positions
    cut = sum(len(words) > longest for words in captions)
    if cut:
        print(f"capeen: {cut} of the {len(captions)} {split} captions are longer than the model's {longest} words "
              f"and are cut to them", file=sys.stderr)
    words = [word for caption in captions for word in caption]
    unknown = sum(word not in tokenizer.index for word in words)
    if unknown:
        print(f"capeen: {unknown} of the {len(words)} words of the {split} captions "
              f"({100 * unknown / len(words):.1f}%) are not in the model's vocabulary and become <unk>",
              file=sys.stderr)


def build_tokenizer(json_path: Path, min_count: int = 1) -> WordTokenizer:
    """The vocabulary of the training captions: every word seen at least `min_count` times (the others read as
    <unk>; Karpathy's COCO and Flickr30k vocabularies keep words seen 5 times or more)."""
    records = records_for_split(load_karpathy(resolve_dataset_json(json_path)), "train")
    captions = [caption for record in records for caption in record.captions]
    tokenizer = WordTokenizer.build(captions, min_count=min_count)
    if len(tokenizer) == len(SPECIALS):
        raise DatasetError(f"{json_path}: no word of the training captions is seen {min_count} times or more "
                           f"(--min-word-count): the model would have nothing but {UNK} to say")
    if min_count > 1:  # what share of the words that is, the captions' loader says as it encodes them
        print(f"capeen: vocabulary of {len(tokenizer) - len(SPECIALS)} words seen at least {min_count} times in the "
              f"training captions; the others read as {UNK}", file=sys.stderr)
    return tokenizer
