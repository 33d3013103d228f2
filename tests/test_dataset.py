"""Karpathy-style caption loader (`models.dataset`) on hand-made files in the real COCO/Flickr30k formats and ours."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.dataset import DatasetError, load_karpathy, records_for_split, tokenize
from models.images import load_image
from models.preprocess import image_to_uint8
from models.synthetic import generate_dataset
from models.training_data import split_pixels

FIXTURES = Path(__file__).parent / "fixtures"


def test_coco_format() -> None:
    records = load_karpathy(FIXTURES / "karpathy_coco_tiny.json")
    assert [r.image_path for r in records] == [
        FIXTURES / "val2014" / "COCO_val2014_000000000042.png",
        FIXTURES / "train2014" / "COCO_train2014_000000000073.png",
        FIXTURES / "val2014" / "COCO_val2014_000000000074.png",
    ]
    assert all(r.image_path.is_file() for r in records)
    assert [r.split for r in records] == ["test", "train", "val"]  # restval counts as train
    assert [r.image_id for r in records] == [42, 73, 74]  # the COCO id, which COCO evaluation needs
    first = records[0]
    assert len(first.captions) == 3 and first.captions[1][:3] == ["man", "riding", "a"]
    assert first.raw[0] == "A man with a red helmet on a small moped."
    assert first.objects is None
    with Image.open(first.image_path) as im:
        assert im.size == (8, 8)


def test_restval_can_be_kept() -> None:
    records = load_karpathy(FIXTURES / "karpathy_coco_tiny.json", keep_restval=True)
    assert [r.split for r in records] == ["test", "restval", "val"]
    assert [r.image_id for r in records_for_split(records, "restval")] == [73]


def test_flickr_format_with_image_root() -> None:
    records = load_karpathy(FIXTURES / "karpathy_flickr_tiny.json", image_root=FIXTURES / "flickr30k_images")
    assert [r.image_path.name for r in records] == ["1000092795.png", "10002456.png"]
    assert all(r.image_path.is_file() for r in records)
    assert [r.image_id for r in records] == [0, 1]
    assert [len(r.captions) for r in records] == [2, 2]
    assert [r.image_id for r in records_for_split(records, "test")] == [1]
    assert records_for_split(records, "val") == []
    with pytest.raises(ValueError):
        records_for_split(records, "dev")


def test_our_format(tmp_path: Path) -> None:
    json_path = generate_dataset(tmp_path, 3, 1, 2, seed=0, workers=1)
    records = load_karpathy(json_path)
    assert [r.split for r in records] == ["train"] * 3 + ["val"] + ["test"] * 2
    assert records[3].image_path == tmp_path / "images" / "val_000000.png"
    assert all(r.image_path.is_file() and r.objects and len(r.captions) == 5 for r in records)
    assert records[0].captions[0] == records[0].raw[0].split()


def test_tokenize() -> None:
    assert tokenize("A Dog's toy, on the  COUCH!") == ["a", "dog's", "toy", "on", "the", "couch"]
    assert tokenize("  ...  ") == []


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "dataset.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _entry(**overrides) -> dict:
    entry = {"filename": "a.png", "split": "train", "imgid": 0, "sentences": [{"tokens": ["a", "cat"], "raw": "A cat"}]}
    entry.update(overrides)
    return {key: value for key, value in entry.items() if value is not None}


def test_raw_only_sentences_are_tokenized_and_tokens_lowercased(tmp_path: Path) -> None:
    sentences = [{"raw": "Two Dogs, running!"}, {"tokens": ["A", "Cat"]}, {"tokens": [], "raw": ""}]
    [record] = load_karpathy(_write(tmp_path, {"images": [_entry(sentences=sentences)]}))
    assert record.captions == [["two", "dogs", "running"], ["a", "cat"]]  # the empty one is dropped
    assert record.raw == ["Two Dogs, running!", "a cat"]
    assert record.empty_sentences == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], 'expected a JSON object with "images", got list'),
        ({"dataset": "x"}, 'missing "images" list'),
        ({"images": [_entry(), _entry(sentences=None)]}, 'images[1]: missing "sentences"'),
        ({"images": [_entry(sentences=[])]}, 'images[0]: "sentences" is not a non-empty list'),
        ({"images": [_entry(filename=None)]}, 'images[0]: missing "filename"'),
        ({"images": [_entry(filename=3)]}, 'images[0]: "filename" is not a non-empty string'),
        ({"images": [_entry(filename="a\0.png")]}, 'images[0]: "filename" holds a NUL character'),
        ({"images": [_entry(split="dev")]}, "images[0]: unknown split 'dev'"),
        ({"images": [_entry(split=None)]}, 'images[0]: missing "split"'),
        ({"images": ["a.png"]}, "images[0]: expected an object, got str"),
        ({"images": [_entry(sentences=[{"sentid": 1}])]}, 'images[0].sentences[0]: missing "tokens" and "raw"'),
        ({"images": [_entry(sentences=[{"tokens": "a cat"}])]}, 'images[0].sentences[0]: "tokens" is not a list'),
        ({"images": [_entry(sentences=[{"raw": 5}])]}, 'images[0].sentences[0]: "raw" is not a string'),
        ({"images": [_entry(sentences=[{"raw": "!!"}])]}, "images[0]: every sentence is empty"),
        ({"images": [_entry(objects="circle")]}, 'images[0]: "objects" is not a list of objects'),
        ({"images": [_entry(objects=[{"foo": 1}])]}, 'images[0].objects[0]: missing "shape"'),
        ({"images": [_entry(), _entry(objects=[{"shape": "star", "colour": "red", "size": "small"},
                                               {"shape": "star", "size": "small"}])]},
         'images[1].objects[1]: missing "colour"'),
        ({"images": [_entry(objects=[{"shape": "hexagon", "colour": "red", "size": "small"}])]},
         "images[0].objects[0]: unknown shape 'hexagon'"),
        ({"images": [_entry(objects=[{"shape": "star", "colour": "red", "size": ["big"]}])]},
         "images[0].objects[0]: unknown size ['big']"),
        ('{"images": [\n  {"filename": "a.png",,}\n]}', "invalid JSON at line 2 column 24"),
    ],
)
def test_malformed_files_give_one_line(tmp_path: Path, data, message: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as info:
        load_karpathy(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ") and message in text, text


def test_a_device_or_a_huge_file_is_not_read_into_memory(tmp_path: Path, monkeypatch) -> None:
    import models.dataset

    with pytest.raises(DatasetError, match="/dev/zero: not a regular file"):
        load_karpathy("/dev/zero")
    big = tmp_path / "dataset.json"
    big.write_text('{"images": []}' + " " * 2000)
    monkeypatch.setattr(models.dataset, "MAX_CAPTION_FILE_BYTES", 1000)
    with pytest.raises(DatasetError, match="more than a caption file is read"):
        load_karpathy(big)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_karpathy(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_karpathy(tmp_path / "bin.json")


def test_pixels_are_cached_beside_the_data_set_and_a_read_only_one_still_loads(tmp_path: Path, monkeypatch) -> None:
    json_path = generate_dataset(tmp_path, 3, 1, 2, seed=0, image_size=32, workers=1)
    _, first = split_pixels(json_path, "train", 32)
    assert len(list((tmp_path / "cache").glob("train-32px-*.npy"))) == 1
    _, cached = split_pixels(json_path, "train", 32)
    assert torch.equal(first, cached)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(np, "save", read_only)
    _, pixels = split_pixels(json_path, "val", 32)  # not cached yet, and the cache cannot be written
    assert pixels.shape == (1, 3, 32, 32)
    assert not list((tmp_path / "cache").glob("val-*"))


def test_an_interrupted_cache_write_leaves_nothing_behind_and_the_next_run_caches(tmp_path: Path, monkeypatch):
    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    real_save = np.save

    def interrupted(path, array):
        Path(path).write_bytes(b"\x93NUMPY half")  # a part of the file is on disk when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        split_pixels(json_path, "train", 32)
    assert not list((tmp_path / "cache").iterdir())
    monkeypatch.setattr(np, "save", real_save)
    split_pixels(json_path, "train", 32)
    assert [path.suffix for path in (tmp_path / "cache").iterdir()] == [".npy"]


def test_temporaries_of_killed_writers_are_swept_and_a_live_writers_kept(tmp_path: Path) -> None:
    # a SIGKILL or an out-of-memory kill during a write runs no clean-up: its temporary (17 GB for COCO) must
    # not stay for good, while a run writing its own at this moment must not lose it
    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    cache = tmp_path / "cache"
    cache.mkdir()
    gone = 999_999_999  # above Linux's largest pid: no process has it
    dead = cache / f"train-32px-0123456789ab.{gone}.tmp.npy"
    writing = cache / f"train-32px-0123456789ab.{os.getppid()}.tmp.npy"  # a live process: the test's parent
    dead.write_bytes(b"half")
    writing.write_bytes(b"half")
    split_pixels(json_path, "train", 32)
    left = sorted(path.name for path in cache.iterdir())
    assert writing.name in left and dead.name not in left and len(left) == 2


def test_a_limited_look_decodes_only_its_images_until_the_split_is_cached(tmp_path: Path, monkeypatch) -> None:
    import models.training_data as training_data

    json_path = generate_dataset(tmp_path, 6, 1, 1, seed=0, image_size=32, workers=1)
    decoded = []
    decode = training_data._decode
    monkeypatch.setattr(training_data, "_decode", lambda record, size: decoded.append(record) or decode(record, size))
    records, few = split_pixels(json_path, "train", 32, limit=2)
    assert len(records) == 2 and few.shape == (2, 3, 32, 32) and len(decoded) == 2
    assert not list((tmp_path / "cache").glob("train-*"))  # no cache of two images posing as the split's
    _, every = split_pixels(json_path, "train", 32)  # the whole split: decoded once and cached
    assert torch.equal(every[:2], few) and len(decoded) == 2 + 6
    records, again = split_pixels(json_path, "train", 32, limit=2)  # from the cache now
    assert torch.equal(again, few) and len(decoded) == 8


def test_a_truncated_or_missing_image_is_one_line_naming_it(tmp_path: Path) -> None:
    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    image = tmp_path / "images" / "train_000001.png"
    image.write_bytes(image.read_bytes()[:120])
    with pytest.raises(DatasetError) as info:
        split_pixels(json_path, "train", 32)
    assert str(info.value).startswith(f"{image}: ") and "truncated" in str(info.value)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").glob("train-*"))  # nothing cached from a split that could not be read
    image.unlink()
    with pytest.raises(DatasetError, match=f"1 of the 3 images of split 'train' not found: {image}$"):
        split_pixels(json_path, "train", 32)


def test_the_pixel_cache_follows_the_images_on_disk(tmp_path: Path) -> None:
    """An image edited or replaced after the split was cached gives its new pixels, not the cached ones; missing
    images are all named at once, before anything is decoded; the replaced cache does not pile up."""
    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    _, before = split_pixels(json_path, "train", 32)
    image = tmp_path / "images" / "train_000001.png"
    Image.new("RGB", (32, 32), (0, 0, 0)).save(image)
    _, after = split_pixels(json_path, "train", 32)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert int(after[1].max()) == 0 and not torch.equal(after[1], before[1])
    assert len(list((tmp_path / "cache").glob("train-32px-*.npy"))) == 1
    for name in ("train_000001.png", "train_000002.png"):
        (tmp_path / "images" / name).unlink()
    with pytest.raises(DatasetError, match=r"^2 of the 3 images of split 'train' not found: .*train_000001\.png, "
                       r".*train_000002\.png$"):
        split_pixels(json_path, "train", 32)
    records, few = split_pixels(json_path, "train", 32, limit=1)  # a quick look before the missing ones
    assert len(records) == 1


def test_training_pixels_are_decoded_as_the_service_decodes_uploads(tmp_path: Path) -> None:
    """Transparency over white, EXIF orientation, 16-bit greyscale scaled: the pixels a model is trained and
    evaluated on are the ones `capeen caption` and the service give it."""
    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    files = sorted((tmp_path / "images").glob("train_*.png"))
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(files[0])  # fully transparent
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(files[1])  # mid-grey in 16 bits
    rotated = Image.new("RGB", (32, 16), (0, 0, 255))
    rotated.paste((0, 255, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated.save(files[2], exif=exif)
    _, pixels = split_pixels(json_path, "train", 32)
    for file, row in zip(files, pixels):
        expected = image_to_uint8(load_image(file), 32)
        assert np.array_equal(row.numpy(), expected), file.name
    assert int(pixels[0].min()) == 255  # transparent is white, not black
    assert 120 <= int(pixels[1].float().mean()) <= 135  # not saturated to white


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other shape"])
def test_an_unreadable_pixel_cache_is_named_and_rebuilt(tmp_path: Path, capsys, damage: str) -> None:
    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    _, first = split_pixels(json_path, "train", 32)
    [cache] = (tmp_path / "cache").glob("train-32px-*.npy")
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:200])
    elif damage == "garbage":
        cache.write_bytes(b"not a numpy file at all")
    else:
        np.save(cache, np.zeros((2, 3, 32, 32), dtype=np.uint8))
    capsys.readouterr()
    _, pixels = split_pixels(json_path, "train", 32)
    assert torch.equal(pixels, first)
    notes = [line for line in capsys.readouterr().err.splitlines() if "pixel cache" in line]  # not tqdm's
    assert len(notes) == 1 and str(cache) in notes[0] and "rebuilding" in notes[0]
    assert np.array_equal(np.load(cache, allow_pickle=False), first.numpy())  # rebuilt on disk
    _, again = split_pixels(json_path, "train", 32)
    assert torch.equal(again, first) and "pixel cache" not in capsys.readouterr().err


def test_json_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DatasetError, match="nested too deeply"):
        load_karpathy(path)


def test_cut_captions_and_unknown_words_are_reported(tmp_path: Path, capsys) -> None:
    from models.tokenizer import SPECIALS, WordTokenizer
    from models.training_data import load_split

    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    captions = [c for r in records_for_split(load_karpathy(json_path), "train") for c in r.captions]
    words = sorted({w for c in captions for w in c})
    longest = max(len(c) for c in captions)
    capsys.readouterr()
    load_split(json_path, "train", WordTokenizer([*SPECIALS, *words]), 32, max_len=longest + 2)
    assert capsys.readouterr().err.count("capeen:") == 0  # every caption fits and every word is known
    split = load_split(json_path, "train", WordTokenizer([*SPECIALS, *words[1:]]), 32, max_len=longest + 1)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("capeen:")]
    cut = sum(len(c) == longest for c in captions)
    unknown = sum(c.count(words[0]) for c in captions)
    assert notes == [
        f"capeen: {cut} of the {len(captions)} train captions are longer than the model's {longest - 1} words and "
        "are cut to them",
        f"capeen: {unknown} of the {sum(map(len, captions))} words of the train captions "
        f"({100 * unknown / sum(map(len, captions)):.1f}%) are not in the model's vocabulary and become <unk>",
    ]
    assert split.captions.shape[-1] == longest + 1


def test_an_image_listed_twice_is_reported(tmp_path: Path, capsys) -> None:
    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    data = json.loads(json_path.read_text())
    data["images"].append(data["images"][0])
    json_path.write_text(json.dumps(data))
    capsys.readouterr()
    records, pixels = split_pixels(json_path, "train", 32)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("capeen:")]
    assert len(records) == len(pixels) == 4
    assert notes == [f"capeen: split 'train' of {json_path} lists 1 image(s) more than once "
                     f"(first: {records[0].image_path}); each listing counts as an image"]


def test_empty_sentences_among_good_ones_are_reported(tmp_path: Path, capsys) -> None:
    # 3 sentences that give 1 caption must not pass without a word: the references shrink too
    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    data = json.loads(json_path.read_text())
    data["images"][0]["sentences"] += [{"raw": "", "tokens": []}, {"raw": "!!!"}]
    json_path.write_text(json.dumps(data))
    capsys.readouterr()
    split_pixels(json_path, "train", 32)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("capeen:")]
    assert notes == [f"capeen: split 'train' of {json_path} has 2 empty sentence(s) (no word), left out of the "
                     "captions and references"]
    split_pixels(json_path, "val", 32)
    assert "empty sentence" not in capsys.readouterr().err  # the val split has none


def test_coco_restval_can_be_asked_for_by_name(tmp_path: Path) -> None:
    """restval counts as train, but `--split restval` means those images alone."""
    json_path = tmp_path / "dataset_coco.json"
    json_path.write_bytes((FIXTURES / "karpathy_coco_tiny.json").read_bytes())
    records, pixels = split_pixels(json_path, "restval", 32, image_root=FIXTURES)
    assert [r.image_id for r in records] == [73] and pixels.shape == (1, 3, 32, 32)
    train, _ = split_pixels(json_path, "train", 32, image_root=FIXTURES)
    assert [r.image_id for r in train] == [73]


def test_a_folder_of_other_caption_files_names_them(tmp_path: Path) -> None:
    """`--data coco/` where coco/ holds dataset_coco.json: say which file to give, not "dataset.json: no such file"."""
    (tmp_path / "dataset_coco.json").write_bytes((FIXTURES / "karpathy_coco_tiny.json").read_bytes())
    with pytest.raises(DatasetError, match=f"no dataset.json; give the caption file itself, e.g. --data "
                                           f"{tmp_path / 'dataset_coco.json'}"):
        split_pixels(tmp_path, "test", 32)


def test_a_caption_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "karpathy_flickr_tiny.json").read_bytes())
    assert len(load_karpathy(path, image_root=FIXTURES / "flickr30k_images")) == 2


def test_a_quick_look_reads_only_its_images_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    json_path = generate_dataset(tmp_path, 5, 1, 0, seed=0, image_size=32, workers=1)
    _, every = split_pixels(json_path, "train", 32)
    loads = []
    original = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(k.get("mmap_mode")) or original(*a, **k))
    records, few = split_pixels(json_path, "train", 32, limit=2)
    assert len(records) == 2 and torch.equal(few, every[:2]) and few.numpy().flags.writeable
    assert loads == ["r"]  # through a memory map, not the whole file into memory


def test_two_caption_files_in_one_folder_keep_a_pixel_cache_each(tmp_path: Path, monkeypatch) -> None:
    """COCO's caption file and a subset of it side by side: each run used to delete the other's cache as stale."""
    import models.training_data

    json_path = generate_dataset(tmp_path, 3, 1, 0, seed=0, image_size=32, workers=1)
    subset = tmp_path / "subset.json"
    subset.write_text(json_path.read_text())
    cache = tmp_path / "cache"
    cache.mkdir()
    before_names = cache / "train-32px-0123456789ab.npy"  # a cache of before caches named their caption file
    before_names.write_bytes(b"old")
    split_pixels(json_path, "train", 32)
    split_pixels(subset, "train", 32)
    assert len(list(cache.glob("train-32px-*.npy"))) == 2 and not before_names.exists()
    assert all(models.dataset.PIXEL_CACHE_FILE.fullmatch(path.name) for path in cache.iterdir())

    def decoded_again(*args, **kwargs):
        raise AssertionError("a cache was decoded again")

    monkeypatch.setattr(models.training_data, "_decode_all", decoded_again)
    for caption_file in (json_path, subset, json_path):
        split_pixels(caption_file, "train", 32)
