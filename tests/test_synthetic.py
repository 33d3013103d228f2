"""Synthetic data generator (`models.synthetic`) and the caption parser / scene metric (`models.scene`)."""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capeen.cli import main
from capeen.errors import UserError
from models.scene import (
    COLOURS,
    SHAPES,
    attribute_accuracy,
    ground_truth,
    lone_object_shape_accuracy,
    parse_caption,
    scene_accuracy,
    scene_accuracy_by_count,
    scene_correct,
)
from models import synthetic
from models.synthetic import _BASE_RGB, BACKGROUNDS, captions_for, draw_example, generate_dataset, render_scene

N_SCENES = 2000


@pytest.fixture(scope="module")
def scenes() -> list[tuple[list[dict], str, list[str]]]:
    out = []
    for i in range(N_SCENES):
        _, objects, background, captions = draw_example(7, "train", i, 96)
        out.append((objects, background, captions))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------------ captions


def test_every_reference_caption_parses_back_to_the_scene(scenes) -> None:
    for objects, _, captions in scenes:
        assert len(captions) == 5
        for caption in captions:
            assert parse_caption(caption) == ground_truth(objects), caption
            assert scene_correct(caption, objects), caption


def test_caption_form(scenes) -> None:
    allowed = set(string.ascii_lowercase + " ")
    for _, _, captions in scenes:
        assert len(set(captions)) == 5  # five differently worded references
        for caption in captions:
            assert set(caption) <= allowed, caption
            assert caption == " ".join(caption.split()), caption
            assert len(caption.split()) <= 30, caption


def test_vocabulary_is_small(scenes) -> None:
    vocabulary = {w for _, _, captions in scenes for c in captions for w in c.split()}
    assert len(vocabulary) < 100, sorted(vocabulary)


def test_families_have_their_frame(scenes) -> None:
    for objects, background, (left_right, total, ordered, chain, with_bg) in scenes:
        n = len(objects)
        assert "objects" in total.split() if n > 1 else "object" in total.split()
        assert "to the left of" in left_right or left_right.endswith(("on its own", "on their own"))
        assert ordered.startswith(("from left to right ", "only "))
        assert " is " in f" {chain} " or " are " in f" {chain} "
        assert with_bg.endswith(" background")
        # the informal families say little/big, the others small/large
        assert not {"little", "big"} & set(left_right.split() + ordered.split() + with_bg.split())
        assert not {"small", "large"} & set(total.split() + chain.split())


def test_plurals_and_counts() -> None:
    objects = [
        {"shape": "cross", "colour": "red", "size": "small", "x": 10.0, "y": 50.0, "radius": 9.0},
        {"shape": "cross", "colour": "red", "size": "small", "x": 30.0, "y": 50.0, "radius": 9.0},
        {"shape": "circle", "colour": "blue", "size": "large", "x": 70.0, "y": 50.0, "radius": 16.0},
    ]
    captions = captions_for(objects, "stripes", np.random.default_rng(0))
    assert captions[0] == "two small red crosses to the left of a large blue circle"
    assert captions[2] == "from left to right two small red crosses then a large blue circle"
    assert captions[3] == "a big blue circle is right of two little red crosses"
    assert "three objects" in captions[1]
    assert captions[4].endswith("two small red crosses and a large blue circle on a striped background")


def test_vertical_relations_use_above_and_below() -> None:
    objects = [
        {"shape": "star", "colour": "white", "size": "large", "x": 40.0, "y": 80.0, "radius": 16.0},
        {"shape": "square", "colour": "black", "size": "small", "x": 45.0, "y": 15.0, "radius": 9.0},
    ]
    chain = captions_for(objects, "noise", np.random.default_rng(0))[3]
    assert chain == "a little black square is above a big white star"


# ------------------------------------------------------------------------------------------------------- scenes


def test_scene_statistics(scenes) -> None:
    counts = Counter(len(objects) for objects, _, _ in scenes)
    assert set(counts) == {1, 2, 3, 4}
    assert all(0.2 < counts[k] / N_SCENES < 0.3 for k in counts)  # uniform over counts
    sizes_per_count = {k: {o["size"] for objs, _, _ in scenes if len(objs) == k for o in objs} for k in counts}
    assert all(s == {"small", "large"} for s in sizes_per_count.values())
    everything = [o for objects, _, _ in scenes for o in objects]
    assert {o["shape"] for o in everything} == set(SHAPES)
    assert {o["colour"] for o in everything} == set(COLOURS)
    assert {bg for _, bg, _ in scenes} == set(BACKGROUNDS)
    multi = [objects for objects, _, _ in scenes if len(objects) > 1]
    with_repeats = sum(max(ground_truth(objs).values()) > 1 for objs in multi)
    assert 0.25 < with_repeats / len(multi) < 0.4  # ~30% copied plus a few chance repeats


def test_objects_inside_image_with_expected_radii(scenes) -> None:
    for objects, _, _ in scenes[:500]:
        for o in objects:
            low, high = (8, 10) if o["size"] == "small" else (15, 18)
            assert low <= o["radius"] <= high
            assert o["radius"] <= o["x"] <= 96 - o["radius"]
            assert o["radius"] <= o["y"] <= 96 - o["radius"]


def test_objects_are_drawn_where_the_labels_say() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        image, objects = render_scene(rng, 96)
        pixels = np.asarray(image).astype(int)
        top = objects[-1]  # drawn last, over the others: its centre shows its own colour (jittered by <= 15)
        centre = pixels[int(top["y"]), int(top["x"])]
        assert np.abs(centre - np.array(_BASE_RGB[top["colour"]])).max() <= 16


def test_image_size_scales_the_scene() -> None:
    image, objects = render_scene(np.random.default_rng(1), 48)
    assert image.size == (48, 48) and image.mode == "RGB"
    for o in objects:
        low, high = (4, 5) if o["size"] == "small" else (7.5, 9)
        assert low <= o["radius"] <= high


# ------------------------------------------------------------------------------------------------------ data set


def test_generate_dataset_layout(tmp_path: Path) -> None:
    json_path = generate_dataset(tmp_path / "d", 5, 2, 3, seed=1, workers=1)
    data = json.loads(json_path.read_text())
    assert data["dataset"] == "capeen-shapes" and data["seed"] == 1 and data["image_size"] == 96
    images = data["images"]
    assert [i["split"] for i in images] == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    assert [i["imgid"] for i in images] == list(range(10))
    assert images[5]["filename"] == "val_000000.png" and images[5]["filepath"] == "images"
    for entry in images:
        assert len(entry["sentences"]) == 5
        for s in entry["sentences"]:
            assert s["tokens"] == s["raw"].split()
        assert set(entry["objects"][0]) == {"shape", "colour", "size", "x", "y", "radius"}
        with Image.open(json_path.parent / entry["filepath"] / entry["filename"]) as im:
            assert im.size == (96, 96) and im.mode == "RGB"


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", 12, 3, 3, seed=5, workers=1)
    generate_dataset(tmp_path / "b", 12, 3, 3, seed=5, workers=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    generate_dataset(tmp_path / "c", 12, 3, 3, seed=6, workers=1)
    assert _files(tmp_path / "a")["dataset.json"] != _files(tmp_path / "c")["dataset.json"]


def test_regenerating_into_our_own_output_replaces_it(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 4, 1, 1, seed=0, workers=1)
    generate_dataset(tmp_path, 2, 1, 0, seed=0, workers=1)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "train_000000.png", "train_000001.png", "val_000000.png",
    ]  # fmt: skip
    assert len(json.loads((tmp_path / "dataset.json").read_text())["images"]) == 3


def _stop_drawing_after(monkeypatch, n: int, error: BaseException) -> None:
    """The generator stops (Ctrl-C, a full disk) after drawing `n` images."""
    drawn = []
    original = synthetic.draw_example

    def draw(*args, **kwargs):
        if len(drawn) == n:
            raise error
        drawn.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic, "draw_example", draw)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_stopped_regeneration_leaves_the_earlier_data_set_whole(tmp_path: Path, monkeypatch, error) -> None:
    generate_dataset(tmp_path / "d", 6, 2, 0, seed=0, image_size=32, workers=1)
    before = _files(tmp_path / "d")
    with monkeypatch.context() as m:
        _stop_drawing_after(m, 5, error)
        with pytest.raises(type(error)):
            generate_dataset(tmp_path / "d", 8, 1, 1, seed=1, image_size=32, workers=1)
    assert _files(tmp_path / "d") == before  # no image of seed 1 beside the dataset.json of seed 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["dataset.json", "images"]
    # and a complete regeneration still replaces it
    generate_dataset(tmp_path / "d", 8, 1, 1, seed=1, image_size=32, workers=1)
    generate_dataset(tmp_path / "fresh", 8, 1, 1, seed=1, image_size=32, workers=1)
    assert _files(tmp_path / "d") == _files(tmp_path / "fresh")


def test_a_stopped_first_generation_leaves_nothing_and_a_killed_ones_leftovers_are_cleared(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    with monkeypatch.context() as m:
        _stop_drawing_after(m, 2, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            generate_dataset(tmp_path / "new", 4, 0, 0, seed=0, image_size=32, workers=1)
    assert not (tmp_path / "new").exists()
    # a generation killed outright (SIGKILL) leaves its staging folder: the next one accepts and removes it
    generate_dataset(tmp_path / "d", 2, 0, 0, seed=0, image_size=32, workers=1)
    staging = tmp_path / "d" / ".capeen-data-killed"
    (staging / "images").mkdir(parents=True)
    (staging / "images" / "train_000000.png").write_bytes(b"half")
    generate_dataset(tmp_path / "d", 3, 0, 0, seed=0, image_size=32, workers=1)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["dataset.json", "images"]


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": -1}, {"n_val": -2}, {"image_size": 31}, {"image_size": 20000}, {"seed": -1}, {"workers": -1}],
)
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs: dict) -> None:
    args = {"n_train": 1, "n_val": 0, "n_test": 0, "seed": 0} | kwargs
    with pytest.raises(UserError):
        generate_dataset(tmp_path / "out", **args)


def test_regenerating_a_data_set_that_was_used_replaces_its_pixel_cache_too(tmp_path: Path) -> None:
    """Every command that reads the data set leaves a pixel cache beside it; it was taken for somebody's files."""
    from models.training_data import split_pixels

    generate_dataset(tmp_path, 4, 1, 1, seed=0, image_size=32, workers=1)
    split_pixels(tmp_path, "train", 32)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npy"]
    generate_dataset(tmp_path, 2, 1, 0, seed=1, image_size=32, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "images"]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine, in a folder of that name")
    with pytest.raises(UserError, match=r"not empty .*\(cache\)"):
        generate_dataset(tmp_path, 2, 1, 0, seed=1, image_size=32, workers=1)


def test_refuses_a_directory_holding_something_else(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"not empty .*\(notes\.txt\)"):
        generate_dataset(tmp_path, 1, 0, 0, seed=0)
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.json").write_text('{"dataset": "coco", "images": []}')
    with pytest.raises(UserError, match="not empty"):
        generate_dataset(other, 1, 0, 0, seed=0)


def test_cli(tmp_path: Path, capsys) -> None:
    assert main(["data", "--out", str(tmp_path / "d"), "--n-train", "3", "--n-val", "1", "--n-test", "1",
                 "--seed", "2", "--image-size", "64", "--workers", "1"]) == 0  # fmt: skip
    with Image.open(tmp_path / "d" / "images" / "test_000000.png") as im:
        assert im.size == (64, 64)
    capsys.readouterr()
    assert main(["data", "--out", str(tmp_path / "e"), "--n-train", "-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n-train" in err[0]


# -------------------------------------------------------------------------------------------------------- parser


def test_parser_maps_synonyms_and_rejects_garbled_captions() -> None:
    assert parse_caption("two big red crosses and a little blue star") == Counter(
        {("cross", "red", "large"): 2, ("star", "blue", "small"): 1}
    )
    for garbled in [
        "",
        "a nice picture",
        "two small red cross",  # plural missing
        "a small red circles",
        "a small red circle and two large blue",  # unfinished group
        "a small red circle next to blue",  # stray colour
        "a small red circle and two",
        "there are two three objects a small red circle",
    ]:
        assert parse_caption(garbled) is None, garbled


def test_scene_correct_checks_counts_and_totals() -> None:
    objects = [
        {"shape": "circle", "colour": "red", "size": "small"},
        {"shape": "circle", "colour": "red", "size": "small"},
    ]
    assert scene_correct("two small red circles", objects)
    assert scene_correct("there are two objects two little red circles", objects)
    assert not scene_correct("there are three objects two little red circles", objects)
    assert not scene_correct("a small red circle", objects)
    assert not scene_correct("two large red circles", objects)
    assert not scene_correct("two small red squares", objects)
    assert scene_accuracy(["two small red circles", "a red thing"], [objects, objects]) == 0.5
    assert scene_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        scene_accuracy(["x"], [])


def test_lone_object_shape_accuracy_is_split_by_size_and_skips_crowded_scenes() -> None:
    small_star = [{"shape": "star", "colour": "red", "size": "small"}]
    large_circle = [{"shape": "circle", "colour": "blue", "size": "large"}]
    crowded = [*small_star, *large_circle]
    captions = [
        "a small red star",  # right
        "a large green star",  # shape right, the rest wrong: still counts for shape
        "a small red diamond",  # shape wrong
        "a small red star and a small red star",  # two objects named for one: wrong
        "a large blue circle",  # right
        "a small red star and a large blue circle",  # a crowded scene: not counted
    ]
    scenes = [small_star, small_star, small_star, small_star, large_circle, crowded]
    assert lone_object_shape_accuracy(captions, scenes) == {
        "small": {"accuracy": 2 / 4, "images": 4}, "large": {"accuracy": 1.0, "images": 1}}
    assert lone_object_shape_accuracy(captions[-1:], scenes[-1:]) == {}
    with pytest.raises(ValueError):
        lone_object_shape_accuracy(["x"], [])


def test_scene_accuracy_by_count_splits_the_images_by_how_many_objects_they_hold() -> None:
    lone = [{"shape": "star", "colour": "red", "size": "small"}]
    pair = [*lone, {"shape": "circle", "colour": "blue", "size": "large"}]
    captions = ["a small red star", "a small red diamond",
                "a small red star and a large blue circle", "a small red star", "red red red"]
    scenes = [lone, lone, pair, pair, pair]
    assert scene_accuracy_by_count(captions, scenes) == {
        1: {"accuracy": 1 / 2, "images": 2}, 2: {"accuracy": 1 / 3, "images": 3}}
    assert scene_accuracy(captions, scenes) == 2 / 5
    assert scene_accuracy_by_count([], []) == {}
    with pytest.raises(ValueError):
        scene_accuracy_by_count(["x"], [])


def test_attribute_accuracy_tells_which_part_of_the_scene_is_wrong() -> None:
    scene = [{"shape": "circle", "colour": "red", "size": "small"},
             {"shape": "star", "colour": "blue", "size": "large"}]
    captions = [
        "a small red circle and a large blue star",  # all right
        "a small red square and a large blue star",  # one shape wrong
        "a small blue circle and a large red star",  # colours right but swapped: only scene accuracy sees it
        "a small red circle",  # an object missing
        "red red red",  # does not parse: nothing right
    ]
    accuracy = attribute_accuracy(captions, [scene] * len(captions))
    assert accuracy == {"count": 3 / 5, "shape": 2 / 5, "colour": 3 / 5, "size": 3 / 5}
    assert scene_accuracy(captions, [scene] * len(captions)) == 1 / 5
    with pytest.raises(ValueError):
        attribute_accuracy(["x"], [])
