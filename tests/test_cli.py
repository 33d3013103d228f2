"""The `capeen` command line, driven in-process through `capeen.cli.main` (and once as `python -m capeen`).

Users see exit codes and stderr: 0 on success, 1 when some images could not be captioned, 2 for a usage problem,
and every expected failure is ONE line on stderr, never a traceback.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capeen.cli import main
from models.scene import COLOURS
from models.synthetic import generate_dataset
from models.tokenizer import SPECIALS
from tests.conftest import make_tiny_checkpoint

N_LAYER = 4  # tests.conftest.tiny_config
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in [("a.png", (48, 40)), ("b.png", (32, 32)), ("c.jpg", (64, 20))]:
        paths[name] = root / name
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[name])
    png = paths["a.png"].read_bytes()
    paths["empty.png"] = root / "empty.png"
    paths["empty.png"].write_bytes(b"")
    paths["notes.txt"] = root / "notes.txt"
    paths["notes.txt"].write_text("this is not an image\n")
    paths["truncated.png"] = root / "truncated.png"
    paths["truncated.png"].write_bytes(png[: len(png) // 2])
    paths["header-only.png"] = root / "header-only.png"
    paths["header-only.png"].write_bytes(png[:12])
    paths["missing.png"] = root / "missing.png"
    paths["a-directory.png"] = root / "a-directory.png"
    paths["a-directory.png"].mkdir()
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-data") / "shapes"
    generate_dataset(out, 2, 4, 6, seed=1, image_size=32, workers=1)
    return out


@pytest.fixture(scope="module")
def speaking_checkpoint(tiny_checkpoint, data, tmp_path_factory):
    """The tiny model made to repeat one colour word whatever the image, at every exit. The random tiny model
    ends every caption at once, so its full depth scores CIDEr-D 0 and calibration cannot measure anything; this
    one's captions share that word with some validation images' references and not others, so it scores above
    0 (CIDEr-D weighs a word by how few images' references hold it)."""
    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.dataset import load_karpathy, records_for_split

    first_three = records_for_split(load_karpathy(data / "dataset.json"), "val")[:3]  # the tests' --limit 3
    holders = {colour: sum(any(colour in words for words in r.captions) for r in first_three) for colour in COLOURS}
    word = next(colour for colour, count in holders.items() if 0 < count < len(first_three))
    ckpt = load_checkpoint(tiny_checkpoint, device="cpu")
    token = ckpt.tokenizer.index[word]
    model = ckpt.model
    with torch.no_grad():
        heads = [(model.decoder.transformer.ln_f, model.decoder.lm_head)]
        heads += [(head.ln, head.proj) for head in model.exits.values()]
        for norm, projection in heads:  # a constant normalised state, read as one word with confidence ~1
            norm.weight.zero_()
            norm.bias.zero_()
            norm.bias[0] = 1.0
            projection.weight.zero_()
            projection.weight[token, 0] = 10.0
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("speaking") / "checkpoint")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def screen(err: str) -> list[str]:
    """The non-blank stderr lines a terminal ends up showing (progress bars redraw themselves with \\r)."""
    return [shown for line in err.split("\n") if (shown := line.rsplit("\r", 1)[-1]).strip()]


def assert_one_line_error(err: str, *fragments: str) -> str:
    lines = screen(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ----- caption: success -----------------------------------------------------------------------------------------
def test_caption_json_lists_caption_tokens_exit_layers_and_confidences(capsys, tiny_checkpoint, images):
    rc, out, err = run(capsys, "caption", images["a.png"], images["b.png"], images["c.jpg"],
                       "--checkpoint", tiny_checkpoint, "--json", "--device", "cpu")
    assert rc == 0 and err == ""
    items = json.loads(out)
    assert [item["image"] for item in items] == [str(images[n]) for n in ("a.png", "b.png", "c.jpg")]
    for item in items:
        assert isinstance(item["caption"], str)
        assert len(item["tokens"]) == len(item["exit_layers"]) == len(item["confidences"]) >= 1
        assert item["threshold"] == 0.6  # the checkpoint's calibrated threshold
        assert set(item["exit_layers"]) <= {1, 2, 3, N_LAYER}
        for layer, confidence in zip(item["exit_layers"], item["confidences"]):
            assert 0.0 <= confidence <= 1.0
            if layer < N_LAYER:  # a token only leaves early when its exit is confident enough
                assert confidence >= 0.6 - 1e-4
        # the caption is the tokens without special tokens
        assert item["caption"] == " ".join(t for t in item["tokens"] if t not in SPECIALS)
    assert any(layer < N_LAYER for item in items for layer in item["exit_layers"]), "no token exited early"


def test_caption_full_mode_runs_every_layer(capsys, tiny_checkpoint, images):
    rc, out, _ = run(capsys, "caption", images["a.png"], images["b.png"], "--checkpoint", tiny_checkpoint,
                     "--json", "--mode", "full", "--device", "cpu")
    assert rc == 0
    for item in json.loads(out):
        assert item["threshold"] is None
        assert item["exit_layers"] == [N_LAYER] * len(item["tokens"])


def test_caption_threshold_and_max_tokens_options(capsys, tiny_checkpoint, images):
    rc, out, _ = run(capsys, "caption", images["a.png"], "--checkpoint", tiny_checkpoint, "--json",
                     "--threshold", "1.0", "--max-tokens", "3", "--device", "cpu")
    assert rc == 0
    (item,) = json.loads(out)
    assert item["threshold"] == 1.0 and 1 <= len(item["tokens"]) <= 3


def test_caption_plain_output(capsys, tiny_checkpoint, images):
    rc, out, _ = run(capsys, "caption", images["a.png"], "--checkpoint", tiny_checkpoint, "--device", "cpu")
    rc_json, out_json, _ = run(capsys, "caption", images["a.png"], "--checkpoint", tiny_checkpoint, "--json",
                               "--device", "cpu")
    assert rc == rc_json == 0
    assert out.rstrip("\n") == json.loads(out_json)[0]["caption"]  # deterministic, caption only
    rc, out, _ = run(capsys, "caption", images["a.png"], images["b.png"], "--checkpoint", tiny_checkpoint,
                     "--device", "cpu", "--batch-size", "1")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2
    assert lines[0].startswith(f"{images['a.png']}\t") and lines[1].startswith(f"{images['b.png']}\t")


def test_every_command_takes_its_checkpoint_from_capeen_checkpoint_as_serve_does(capsys, tiny_checkpoint, images,
                                                                                  tmp_path, monkeypatch):
    rc, named, _ = run(capsys, "caption", images["a.png"], "--checkpoint", tiny_checkpoint, "--device", "cpu")
    monkeypatch.setenv("CAPEEN_CHECKPOINT", str(tiny_checkpoint))
    rc_env, from_env, _ = run(capsys, "caption", images["a.png"], "--device", "cpu")
    assert rc == rc_env == 0 and from_env == named  # the tiny model's caption, not the shipped one's
    monkeypatch.setenv("CAPEEN_CHECKPOINT", str(tmp_path / "gone"))
    for command in (["caption", images["a.png"]], ["evaluate", "--data", str(tmp_path)],
                    ["bench", "--data", str(tmp_path)], ["calibrate", "--data", str(tmp_path)],
                    ["bench-drift", "--data", str(tmp_path)]):
        rc, _, err = run(capsys, *command)
        assert rc == 2
        assert_one_line_error(err, f"{tmp_path / 'gone'}: checkpoint directory not found")
    # with --server the captions are the server's: a checkpoint from the environment is no reason to refuse
    rc, _, err = run(capsys, "caption", images["a.png"], "--server", "http://127.0.0.1:9", "--retries", "0")
    assert rc == 2 and "--checkpoint" not in err and "127.0.0.1:9" in err


def test_calibrate_rewrites_only_a_checkpoint_it_was_given(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("CAPEEN_CHECKPOINT", raising=False)
    rc, _, err = run(capsys, "calibrate", "--data", str(tmp_path))
    assert rc == 2
    assert_one_line_error(err, "capeen calibrate: error:", "--checkpoint DIR or CAPEEN_CHECKPOINT",
                          "models/checkpoints/default")


@pytest.mark.parametrize("form", [[], ["--jsonl"]], ids=["text", "jsonl"])
def test_caption_reads_captions_and_prints_a_batch_at_a_time(capsys, tiny_checkpoint, images, monkeypatch, form):
    # a user captioning a folder of thousands of photos: never all of them decoded in memory at once, and
    # each batch's captions printed before the next batch is read
    import models.images
    from models.engine import CaptionEngine

    events: list[str] = []
    real_load, real_caption = models.images.load_image, CaptionEngine.caption
    monkeypatch.setattr(models.images, "load_image", lambda path, **kw: events.append("read") or real_load(path, **kw))

    def caption(self, batch, *args, **kwargs):
        events.append(f"caption {len(batch)}")
        return real_caption(self, batch, *args, **kwargs)

    real_print = print

    def recording_print(*args, **kwargs):
        events.append("print")
        real_print(*args, **kwargs)

    monkeypatch.setattr(CaptionEngine, "caption", caption)
    monkeypatch.setattr("builtins.print", recording_print)
    paths = [images["a.png"], images["b.png"], images["empty.png"], images["c.jpg"], images["a.png"],
             images["b.png"]]
    rc, out, err = run(capsys, "caption", *paths, "--checkpoint", tiny_checkpoint, "--device", "cpu",
                       "--batch-size", "2", "--workers", "0", *form)
    assert rc == 1 and "empty" in err  # the empty file is reported and skipped; the others are captioned
    assert len(out.splitlines()) == (6 if form else 5)  # --jsonl: a line for the failed image too
    record = ["print"] if form else []  # --jsonl: the failed image's own line too
    assert events == [
        "read", "read", "caption 2", "print", "print",
        "read", "print", *record, "read", "read", "caption 2", "print", "print",  # no gap in the batch
        "read", "caption 1", "print"]


def test_caption_workers_read_ahead_in_order_and_within_bounds(capsys, tiny_checkpoint, images, monkeypatch):
    # threads decode the next photos while the model captions: same output, in order, and a folder of
    # thousands never read far ahead of what is printed
    import models.images
    from models.engine import CaptionEngine

    names = ["a.png", "b.png", "notes.txt", "c.jpg", "a.png", "empty.png", "b.png", "c.jpg", "a.png", "b.png"]
    paths = [images[name] for name in names * 2]
    args = ["caption", *paths, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--batch-size", "2", "--jsonl"]
    rc_alone, alone, _ = run(capsys, *args, "--workers", "0")
    reads, printed, worst = [0], [0], [0]
    real_load, real_caption = models.images.load_image, CaptionEngine.caption

    def load(path, **kwargs):
        reads[0] += 1
        return real_load(path, **kwargs)

    def caption(self, batch, *args, **kwargs):
        worst[0] = max(worst[0], reads[0] - printed[0])
        result = real_caption(self, batch, *args, **kwargs)
        printed[0] += len(batch)
        return result

    monkeypatch.setattr(models.images, "load_image", load)
    monkeypatch.setattr(CaptionEngine, "caption", caption)
    rc, ahead, _ = run(capsys, *args, "--workers", "3")
    assert (rc, ahead) == (rc_alone, alone) == (1, alone)
    assert reads[0] == len(paths)
    assert worst[0] <= 2 * 2 + 3 + 1 + 4  # a batch waiting, a batch and the workers' share ahead; failed reads


def test_caption_is_the_same_in_any_batch(capsys, tiny_checkpoint, images):
    args = ["caption", images["a.png"], images["b.png"], images["c.jpg"], "--checkpoint", tiny_checkpoint,
            "--json", "--device", "cpu"]
    _, together, _ = run(capsys, *args, "--batch-size", "3")
    _, alone, _ = run(capsys, *args, "--batch-size", "1")
    strip = lambda items: [(i["tokens"], i["exit_layers"]) for i in json.loads(items)]  # noqa: E731
    assert strip(together) == strip(alone)


def test_caption_a_folder_captions_every_image_under_it_in_name_order(capsys, tiny_checkpoint, images, tmp_path):
    # a user captioning a photo library: `capeen caption photos/`, subfolders included, other files left alone
    shutil.copy(images["b.png"], tmp_path / "b.png")
    (tmp_path / "2024" / "june").mkdir(parents=True)
    shutil.copy(images["a.png"], tmp_path / "2024" / "june" / "A.PNG")
    shutil.copy(images["c.jpg"], tmp_path / "2024" / "c.jpeg")
    (tmp_path / "2024" / "notes.txt").write_text("not an image\n")
    (tmp_path / ".thumbnails").mkdir()
    shutil.copy(images["a.png"], tmp_path / ".thumbnails" / "a.png")
    (tmp_path / "._b.png").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata beside b.png: no image
    rc, out, err = run(capsys, "caption", tmp_path, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--json")
    assert rc == 0 and err == ""
    found = [tmp_path / "b.png", tmp_path / "2024" / "c.jpeg", tmp_path / "2024" / "june" / "A.PNG"]
    items = json.loads(out)
    assert [item["image"] for item in items] == [str(path) for path in found]
    _, one_by_one, _ = run(capsys, "caption", *found, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--json")
    assert [item["tokens"] for item in items] == [item["tokens"] for item in json.loads(one_by_one)]
    rc, out, _ = run(capsys, "caption", tmp_path / "2024" / "june", "--checkpoint", tiny_checkpoint, "--device", "cpu")
    assert rc == 0 and out.startswith(f"{tmp_path / '2024' / 'june' / 'A.PNG'}\t")  # a folder's lines name the file


def test_caption_jsonl_gives_every_input_a_line_in_order(capsys, tiny_checkpoint, images, tmp_path):
    # a pipeline reading JSON Lines: one object per image, the failed ones with their error, nothing dropped
    paths = [images["a.png"], images["notes.txt"], images["b.png"], images["truncated.png"], images["c.jpg"]]
    rc, out, err = run(capsys, "caption", *paths, tmp_path, "--checkpoint", tiny_checkpoint, "--device", "cpu",
                       "--jsonl", "--batch-size", "2")
    assert rc == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == [str(path) for path in [*paths, tmp_path]]
    _, as_array, _ = run(capsys, "caption", *paths, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--json")
    assert [line for line in lines if "caption" in line] == json.loads(as_array)
    failed = [line for line in lines if "error" in line]
    assert [set(line) for line in failed] == [{"image", "error"}] * 3
    assert "no image files" in failed[-1]["error"]  # the empty folder
    assert [line for line in screen(err)] == [f"capeen caption: {line['error']}" for line in failed]


def test_caption_engines_write_what_one_engine_writes_in_the_same_order(capsys, tiny_checkpoint, images):
    """--engines 2: the batches go to two engine processes, and the output is the same, line for line."""
    paths = [images["a.png"], images["notes.txt"], images["b.png"], images["truncated.png"], images["c.jpg"],
             images["a.png"], images["b.png"]]
    common = ["caption", *paths, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--jsonl", "--batch-size", "2"]
    rc, one, one_err = run(capsys, *common)
    assert run(capsys, *common, "--engines", 2) == (rc, one, one_err) and rc == 1
    assert len(one.splitlines()) == len(paths)


@pytest.mark.parametrize("failure", ["died", "did not start again"])
def test_caption_a_batch_an_engine_fails_is_its_images_failures_and_the_rest_goes_on(capsys, tiny_checkpoint, images,
                                                                                     monkeypatch, failure):
    from service.engine_process import EngineProcess, EngineProcessDied, EngineStartError

    original, calls = EngineProcess.caption_pixels, []
    error = EngineProcessDied if failure == "died" else EngineStartError

    def dies_once(self, pixels, *args, **kwargs):
        calls.append(len(pixels))
        if len(calls) == 1:
            raise error("the engine process exited (exit code -9) while decoding a batch of 2")
        return original(self, pixels, *args, **kwargs)

    monkeypatch.setattr(EngineProcess, "caption_pixels", dies_once)
    paths = [images["a.png"], images["b.png"], images["c.jpg"], images["a.png"]]
    rc, out, err = run(capsys, "caption", *paths, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--jsonl",
                       "--batch-size", "2", "--engines", "2")
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 1 and [line["image"] for line in lines] == [str(path) for path in paths]
    assert [("error" in line) for line in lines] == [True, True, False, False]
    assert "its batch failed in the engine: the engine process exited (exit code -9)" in lines[0]["error"]
    assert screen(err) == [f"capeen caption: {line['error']}" for line in lines[:2]]


def test_caption_an_engine_killed_between_batches_is_started_again_and_said_so_on_stderr(capsys, tiny_checkpoint,
                                                                                        images, monkeypatch):
    from service.engine_process import EngineProcess

    original, killed = EngineProcess.caption_pixels, []

    def killed_before_its_second_batch(self, pixels, *args, **kwargs):
        if len(killed) == 0 and self.pid in seen:  # this engine's second batch
            killed.append(self.pid)
            os.kill(self.pid, signal.SIGKILL)
            self._process.wait()
        seen.add(self.pid)
        return original(self, pixels, *args, **kwargs)

    seen: set[int] = set()
    monkeypatch.setattr(EngineProcess, "caption_pixels", killed_before_its_second_batch)
    paths = [images["a.png"], images["b.png"], images["c.jpg"]] * 4
    common = ["caption", *paths, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--jsonl", "--batch-size", "2"]
    rc, out, err = run(capsys, *common, "--engines", "2")
    assert killed, "no engine was killed: the test did not run its case"
    assert (rc, out) == run(capsys, *common)[:2] and rc == 0  # started again: every caption as with one engine
    assert screen(err) == [f"capeen caption: the engine process (pid {killed[0]}) is gone (exit code -9); "
                           "starting it again"]


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_caption_stopped_with_engines_leaves_no_engine_process_behind(capsys, tiny_checkpoint, images, monkeypatch,
                                                                     stop):
    import models.commands
    import service.engine_process
    from models.interrupts import Terminated

    started, original_start = [], service.engine_process.start_engines

    def start(*args, **kwargs):
        started.extend(original_start(*args, **kwargs))
        return started

    def interrupt(*args):
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        # what the handler the command installed does on a real SIGTERM (the default would end pytest itself)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(service.engine_process, "start_engines", start)
    monkeypatch.setattr(models.commands, "_write_chunk", interrupt)
    rc, out, err = run(capsys, "caption", images["a.png"], images["b.png"], "--checkpoint", tiny_checkpoint,
                       "--device", "cpu", "--engines", 2)
    assert rc == (130 if stop == "ctrl-c" else 143) and len(started) == 2
    assert not any(engine.alive for engine in started)  # killed, not left decoding for a stopped job
    assert_one_line_error(err, "interrupted" if stop == "ctrl-c" else "terminated")


def test_caption_engines_beyond_the_cores_are_refused_before_any_starts(capsys, tiny_checkpoint, images, monkeypatch):
    import service.engine_process

    def no_start(*args, **kwargs):
        raise AssertionError("an engine started")

    monkeypatch.setattr(service.engine_process, "start_engines", no_start)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    rc, out, err = run(capsys, "caption", images["a.png"], "--checkpoint", tiny_checkpoint, "--device", "cpu",
                       "--engines", 64)
    assert (rc, out) == (2, "")
    assert_one_line_error(err, "--engines 64: this machine has 2 cores, and each engine is a copy of the model")


def test_caption_files_from_a_list_after_the_arguments_in_order(capsys, tiny_checkpoint, images, tmp_path):
    # a manifest of a million images cannot go through the shell's arguments; a list file can, lines read lazily
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(images["b.png"], folder / "b.png")
    odd = tmp_path / "with space \udcff.png"  # a file name that is not UTF-8, as a listing tool writes it
    shutil.copy(images["c.jpg"], odd)
    listing = tmp_path / "manifest.txt"
    listing.write_bytes(b"\n".join([os.fsencode(images["a.png"]), b"", os.fsencode(folder), os.fsencode(odd),
                                     os.fsencode(images["missing.png"])]) + b"\r\n")
    rc, out, err = run(capsys, "caption", images["c.jpg"], "--files-from", listing, "--checkpoint", tiny_checkpoint,
                       "--device", "cpu", "--jsonl")
    assert rc == 1
    assert [json.loads(line)["image"] for line in out.splitlines()] == [
        str(path) for path in (images["c.jpg"], images["a.png"], folder / "b.png", odd, images["missing.png"])]
    assert_one_line_error(err, str(images["missing.png"]))


def test_caption_files_from_standard_input(capsys, tiny_checkpoint, images, monkeypatch):
    listed = f"{images['b.png']}\n{images['a.png']}\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(listed)))
    rc, out, err = run(capsys, "caption", "--files-from", "-", "--checkpoint", tiny_checkpoint, "--device", "cpu")
    assert rc == 0 and err == ""
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(images["b.png"]), str(images["a.png"])]


@pytest.mark.parametrize("argv, fragment", [([], "--files-from LIST"),
                                            (["--files-from", "/no/such/list"], "--files-from /no/such/list"),
                                            (["--files-from", "-"], "standard input is closed")])
def test_caption_without_images_or_with_a_list_it_cannot_read_exits_2(capsys, tiny_checkpoint, monkeypatch, argv,
                                                                      fragment):
    monkeypatch.setattr(sys, "stdin", None)  # `capeen caption --files-from - <&-`
    rc, out, err = run(capsys, "caption", *argv, "--checkpoint", tiny_checkpoint)
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen caption: error:", fragment)


@pytest.mark.parametrize("listing, says", [(b"", "names no image or folder"), (b"\n  \n", "names no image or folder"),
                                           (b"A\nA\0B\0", "line 2 holds a NUL byte")])
def test_caption_a_list_that_ends_in_a_problem_is_a_line_after_the_captions_before_it(capsys, tiny_checkpoint, images,
                                                                                     tmp_path, listing, says):
    # `find -print0 | capeen caption --files-from -`, an empty manifest: a line and exit 1, never a traceback
    listed = tmp_path / "list"
    listed.write_bytes(listing.replace(b"A", os.fsencode(images["a.png"])).replace(b"B", os.fsencode(images["b.png"])))
    rc, out, err = run(capsys, "caption", images["c.jpg"], "--files-from", listed, "--checkpoint", tiny_checkpoint,
                       "--device", "cpu", "--jsonl")
    assert rc == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert "caption" in lines[0] and lines[0]["image"] == str(images["c.jpg"])
    assert lines[-1] == {"image": str(listed), "error": f"--files-from {listed}: " + lines[-1]["error"].split(": ", 1)[1]}
    assert_one_line_error(err, f"capeen caption: --files-from {listed}:", says)


def test_caption_folder_that_cannot_be_listed_is_a_line_and_the_walk_goes_on(capsys, tiny_checkpoint, images,
                                                                             tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "open").mkdir()
    shutil.copy(images["a.png"], tmp_path / "open" / "a.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rc, out, err = run(capsys, "caption", tmp_path, "--checkpoint", tiny_checkpoint, "--device", "cpu")
    assert rc == 1
    assert_one_line_error(err, f"{tmp_path / 'locked'}: cannot list this folder", "Permission denied")
    assert out.startswith(f"{tmp_path / 'open' / 'a.png'}\t")


# ----- caption: failures ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["empty.png", "notes.txt", "truncated.png", "header-only.png", "missing.png",
                                 "a-directory.png"])
def test_unusable_image_is_one_line_and_exit_1_while_good_ones_are_captioned(capsys, tiny_checkpoint, images, bad):
    rc, out, err = run(capsys, "caption", images["a.png"], images[bad], "--checkpoint", tiny_checkpoint,
                       "--json", "--device", "cpu")
    assert rc == 1
    assert_one_line_error(err, "capeen caption:", str(images[bad]))
    assert [item["image"] for item in json.loads(out)] == [str(images["a.png"])]


def test_only_unusable_images_exit_1_with_a_line_each(capsys, tiny_checkpoint, images):
    bad = ["empty.png", "notes.txt", "missing.png"]
    rc, out, err = run(capsys, "caption", *(images[b] for b in bad), "--checkpoint", tiny_checkpoint, "--json")
    lines = screen(err)
    assert rc == 1 and json.loads(out) == []
    assert len(lines) == 3 and "Traceback" not in err
    for line, name in zip(lines, bad):
        assert str(images[name]) in line


@pytest.mark.parametrize("option, fragment", [
    (["--threshold", "1.5"], "threshold"), (["--threshold", "0"], "threshold"), (["--threshold", "-0.2"], "threshold"),
    (["--max-tokens", "0"], "--max-tokens"), (["--batch-size", "0"], "--batch-size"),
    (["--workers", "-1"], "--workers"),
])
def test_bad_caption_options_exit_2_with_one_line(capsys, tiny_checkpoint, images, option, fragment):
    rc, out, err = run(capsys, "caption", images["a.png"], "--checkpoint", tiny_checkpoint, *option)
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen caption: error:", fragment)


def test_missing_checkpoint_directory_exits_2(capsys, images, tmp_path):
    rc, out, err = run(capsys, "caption", images["a.png"], "--checkpoint", tmp_path / "no-such-checkpoint")
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen caption: error:", str(tmp_path / "no-such-checkpoint"))


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_checkpoint_with_broken_safetensors_exits_2(capsys, tiny_checkpoint, images, tmp_path, damage):
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    weights = directory / "model.safetensors"
    if damage == "corrupt":
        weights.write_bytes(os.urandom(2048))
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    rc, out, err = run(capsys, "caption", images["a.png"], "--checkpoint", directory)
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen caption: error:", str(weights))


def test_uncalibrated_checkpoint_needs_a_threshold(capsys, images, tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ck", threshold=None)
    rc, _, err = run(capsys, "caption", images["a.png"], "--checkpoint", directory)
    assert rc == 2
    assert_one_line_error(err, "capeen caption: error:", "calibrate")
    rc, out, _ = run(capsys, "caption", images["a.png"], "--checkpoint", directory, "--threshold", "0.5", "--json")
    assert rc == 0 and json.loads(out)[0]["threshold"] == 0.5


def test_image_error_line_names_the_file_once(capsys, tiny_checkpoint, images):
    _, _, err = run(capsys, "caption", images["truncated.png"], "--checkpoint", tiny_checkpoint)
    assert err.count(str(images["truncated.png"])) == 1


@pytest.mark.parametrize("file, content", [
    ("config.json", None),
    ("thresholds.json", '{"threshold": 0.6, "exit_layers": 5}'),
])
def test_malformed_checkpoint_values_exit_2(capsys, tiny_checkpoint, images, tmp_path, file, content):
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    if content is None:
        config = json.loads((directory / file).read_text())
        config["model"]["n_head"] = 0
        content = json.dumps(config)
    (directory / file).write_text(content)
    rc, _, err = run(capsys, "caption", images["a.png"], "--checkpoint", directory)
    assert rc == 2
    assert_one_line_error(err, "capeen caption: error:")


# ----- other subcommands: errors --------------------------------------------------------------------------------
def test_evaluate_bad_distortion(capsys, tiny_checkpoint, data):
    rc, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", data, "--distortion", "foo")
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen evaluate: error:", "'foo'")


def test_evaluate_missing_data(capsys, tiny_checkpoint, tmp_path):
    rc, _, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", tmp_path / "nothing")
    assert rc == 2
    assert_one_line_error(err, "capeen evaluate: error:", str(tmp_path / "nothing"))


def test_evaluate_flickr30k_with_its_image_folder_elsewhere(capsys, tiny_checkpoint, tmp_path):
    """The usual layout: dataset_flickr30k.json beside flickr30k-images/, not inside it."""
    fixtures = REPO / "tests" / "fixtures"
    caption_file = tmp_path / "dataset_flickr30k.json"
    shutil.copy(fixtures / "karpathy_flickr_tiny.json", caption_file)
    rc, _, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", caption_file, "--mode", "full")
    assert rc == 2
    assert_one_line_error(err, "1 of the 1 images of split 'test' not found", str(tmp_path / "10002456.png"))
    rc, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", caption_file, "--mode", "full",
                       "--image-dir", fixtures / "flickr30k_images")
    assert rc == 0, err
    assert "images=1" in out and "CIDEr-D" in out
    rc, _, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", caption_file,
                     "--image-dir", tmp_path / "no-such-folder")
    assert rc == 2
    assert_one_line_error(err, str(tmp_path / "no-such-folder"), "image folder not found")


def test_a_report_that_cannot_be_written_leaves_the_earlier_one_whole(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    """A full disk while `--json` and `--plot` are written: one line naming the file, last week's report and plot
    as they were, and no temporary file left beside them."""
    import capeen.outputs

    fixtures = REPO / "tests" / "fixtures"
    reports = tmp_path / "reports"
    reports.mkdir()
    report, plot = reports / "report.json", reports / "sweep.png"
    report.write_text('{"last": "week"}\n')
    plot.write_bytes(b"last week's plot")
    caption_file = shutil.copy(fixtures / "karpathy_flickr_tiny.json", tmp_path)  # its pixel cache goes beside it
    evaluate = ["evaluate", "--checkpoint", tiny_checkpoint, "--data", caption_file,
                "--image-dir", fixtures / "flickr30k_images", "--mode", "sweep", "--thresholds", "0.5"]

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(capeen.outputs.os, "fsync", full_disk)
        rc, _, err = run(capsys, *evaluate, "--json", report)
        assert rc == 2
        assert "Traceback" not in err  # the progress bars, then the one line
        assert screen(err)[-1] == f"capeen evaluate: error: --json {report}: cannot write it: No space left on device"
        rc, _, err = run(capsys, *evaluate, "--plot", plot)
        assert rc == 2
        assert "Traceback" not in err
        assert screen(err)[-1] == f"capeen evaluate: error: --plot {plot}: cannot write it: No space left on device"
    assert report.read_text() == '{"last": "week"}\n' and plot.read_bytes() == b"last week's plot"
    assert sorted(path.name for path in reports.iterdir()) == ["report.json", "sweep.png"]
    rc, _, err = run(capsys, *evaluate, "--json", report, "--plot", plot)  # and with room, both are replaced
    assert rc == 0, err
    assert json.loads(report.read_text())[0]["images"] == 1 and plot.read_bytes().startswith(b"\x89PNG")
    assert sorted(path.name for path in reports.iterdir()) == ["report.json", "sweep.png"]


@pytest.mark.parametrize("quality", ["2", "0", "-0.5"])
def test_calibrate_bad_quality(capsys, tiny_checkpoint, data, quality):
    rc, out, err = run(capsys, "calibrate", "--checkpoint", tiny_checkpoint, "--data", data, "--quality", quality)
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen calibrate: error:", "--quality")


@pytest.mark.parametrize("confidence", ["1", "-0.1", "1.5"])
def test_calibrate_bad_confidence(capsys, tiny_checkpoint, data, confidence):
    rc, out, err = run(capsys, "calibrate", "--checkpoint", tiny_checkpoint, "--data", data,
                       "--confidence", confidence)
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen calibrate: error:", "--confidence")


def test_calibrate_bad_thresholds(capsys, tiny_checkpoint, data, tmp_path):
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    for grid in ("0.5,abc", "0.5,1.5"):
        rc, _, err = run(capsys, "calibrate", "--checkpoint", directory, "--data", data, "--thresholds", grid)
        assert rc == 2
        assert_one_line_error(err, "capeen calibrate: error:", "--thresholds")
    assert (directory / "thresholds.json").read_text() == (tiny_checkpoint / "thresholds.json").read_text()


def test_train_exits_without_init(capsys, data, tmp_path):
    rc, _, err = run(capsys, "train", "--stage", "exits", "--data", data, "--out", tmp_path / "out",
                     "--run-dir", tmp_path / "run")
    assert rc == 2
    assert_one_line_error(err, "capeen train: error:", "--init")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, fragment", [('{"n_layer": ', "--model-config"), ('[1]', "--model-config"),
                                              ('{"bogus": 1}', "bogus"), ("[" * 50000, "nested too deeply")])
def test_train_bad_model_config(capsys, data, tmp_path, config, fragment):
    rc, _, err = run(capsys, "train", "--stage", "backbone", "--data", data, "--out", tmp_path / "out",
                     "--run-dir", tmp_path / "run", "--model-config", config)
    assert rc == 2
    assert_one_line_error(err, "capeen train: error:", fragment)


def test_train_missing_data(capsys, tmp_path):
    rc, _, err = run(capsys, "train", "--stage", "backbone", "--data", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert rc == 2
    assert_one_line_error(err, "capeen train: error:", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("option", [["--n-train", "-1"], ["--image-size", "8"], ["--seed", "-3"]])
def test_data_bad_arguments(capsys, tmp_path, option):
    rc, out, err = run(capsys, "data", "--out", tmp_path / "d", "--n-val", "0", "--n-test", "0", *option)
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen data: error:", option[0])


# ----- other subcommands: success on tiny data ------------------------------------------------------------------
def test_calibrate_writes_thresholds_json_with_the_sweep(capsys, speaking_checkpoint, data, tmp_path):
    directory = shutil.copytree(speaking_checkpoint, tmp_path / "ck")
    rc, out, err = run(capsys, "calibrate", "--checkpoint", directory, "--data", data, "--limit", "3",
                       "--thresholds", "0.4,0.8", "--quality", "0.5", "--batch-size", "3", "--device", "cpu",
                       "--no-schedules")
    written = json.loads((directory / "thresholds.json").read_text())
    assert rc == 0 and not [line for line in screen(err) if line.startswith("capeen")]  # progress bars only
    assert written["quality_fraction"] == 0.5 and written["images"] == 3 and written["calibration_split"] == "val"
    assert written["full_depth"]["ciderD"] > 0
    assert {e["threshold"] for e in written["sweep"]} == {0.4, 0.8}
    assert written["threshold"] in (0.4, 0.8) and "calibrated threshold" in out


def test_calibrate_leaves_thresholds_json_when_full_depth_scores_zero(capsys, tiny_checkpoint, data, tmp_path):
    # the tiny random model ends every caption at once: every setting "keeps 100%" of nothing, and choosing
    # the fastest would replace a calibration that measured something
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    before = (directory / "thresholds.json").read_bytes()
    rc, out, err = run(capsys, "calibrate", "--checkpoint", directory, "--data", data, "--limit", "3",
                       "--thresholds", "0.4,0.8", "--batch-size", "3", "--device", "cpu", "--no-schedules")
    assert rc == 1 and "full depth: CIDEr-D 0.000" in out and "Traceback" not in err
    [line] = [line for line in screen(err) if line.startswith("capeen")]  # beside the progress bars
    assert "full depth scores CIDEr-D 0 on split 'val'" in line and "left as it was" in line
    assert (directory / "thresholds.json").read_bytes() == before


def test_calibrate_refuses_what_it_cannot_measure_or_write_before_decoding(capsys, tiny_checkpoint, data, tmp_path,
                                                                        monkeypatch):
    import capeen.outputs
    import models.calibration
    from models.checkpoint import Checkpoint, Thresholds, load_checkpoint, save_checkpoint
    from models.model import CapeenModel
    from tests.conftest import tiny_config

    def no_work(*args, **kwargs):
        raise AssertionError("calibration decoded before the problem was found")

    monkeypatch.setattr(models.calibration, "calibrate", no_work)
    base = ["calibrate", "--data", data, "--thresholds", "0.5", "--no-schedules", "--device", "cpu"]
    one = shutil.copytree(tiny_checkpoint, tmp_path / "one")
    rc, _, err = run(capsys, *base, "--checkpoint", one, "--limit", "1")  # CIDEr-D of one image is always 0
    assert rc == 2
    assert_one_line_error(err, "calibration needs at least 2 images, got 1")

    mounted = shutil.copytree(tiny_checkpoint, tmp_path / "read-only")  # an installed default, say
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # the tests run as root, whom no folder's mode stops
        if Path(dir) == mounted:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(capeen.outputs.tempfile, "mkstemp", mkstemp)
    rc, _, err = run(capsys, *base, "--checkpoint", mounted)
    assert rc == 2
    assert_one_line_error(err, f"folder {mounted} is not writable", "calibrate a copy")

    tokenizer = load_checkpoint(tiny_checkpoint).tokenizer
    exitless = save_checkpoint(Checkpoint(model=CapeenModel(tiny_config(len(tokenizer), exit_layers=[])),
                                          tokenizer=tokenizer, thresholds=Thresholds(threshold=None),
                                          meta={"name": "no-exits"}), tmp_path / "no-exits")
    rc, _, err = run(capsys, *base, "--checkpoint", exitless)
    assert rc == 2
    assert_one_line_error(err, "the model has no exit heads")


def test_a_calibration_that_finds_nothing_leaves_the_checkpoints_own(capsys, speaking_checkpoint, data, tmp_path,
                                                                     monkeypatch):
    import dataclasses

    import models.calibration

    calibrate = models.calibration.calibrate  # the tiny model passes any floor: make this sweep find nothing
    monkeypatch.setattr(models.calibration, "calibrate",
                        lambda *args, **kwargs: dataclasses.replace(calibrate(*args, **kwargs), threshold=None))
    directory = shutil.copytree(speaking_checkpoint, tmp_path / "ck")
    before = (directory / "thresholds.json").read_bytes()
    rc, out, err = run(capsys, "calibrate", "--checkpoint", directory, "--data", data, "--limit", "3",
                       "--thresholds", "0.4", "--batch-size", "3", "--device", "cpu", "--no-schedules")
    assert rc == 1 and "left as it was" in out and "Traceback" not in err
    assert (directory / "thresholds.json").read_bytes() == before


def test_calibrate_with_deferred_kv_fill_makes_it_the_checkpoints_default(capsys, tiny_checkpoint,
                                                                          speaking_checkpoint, data, tmp_path):
    from models.engine import CaptionEngine

    directory = shutil.copytree(speaking_checkpoint, tmp_path / "ck")
    rc, out, err = run(capsys, "calibrate", "--checkpoint", directory, "--data", data, "--limit", "3",
                       "--thresholds", "0.4,0.8", "--quality", "0.01", "--batch-size", "3", "--device", "cpu",
                       "--no-schedules", "--kv-fill", "deferred")
    assert rc == 0 and "Traceback" not in err and "kv fill deferred" in out
    written = json.loads((directory / "thresholds.json").read_text())
    assert written["kv_fill"] == "deferred" and "catch-up layers" in written["criterion"]
    assert all(entry["kv_fill"] == "deferred" for entry in written["sweep"])
    assert all(entry["catch_up_layers_per_token"] >= 0 for entry in written["sweep"])
    assert CaptionEngine.from_checkpoint(directory, device="cpu").kv_fill == "deferred"
    assert CaptionEngine.from_checkpoint(directory, device="cpu", kv_fill="propagate").kv_fill == "propagate"
    assert CaptionEngine.from_checkpoint(speaking_checkpoint, device="cpu").kv_fill == "propagate"  # uncalibrated


def test_evaluate_with_chosen_exits_and_offsets(capsys, tiny_checkpoint, data, tmp_path):
    report_path = tmp_path / "report.json"
    rc, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", data, "--limit", "2",
                       "--mode", "sweep", "--thresholds", "0.5,0.9", "--exits", "2,3", "--exit-offsets", "0.1,0",
                       "--simulated-exits", "--json", report_path, "--device", "cpu")
    assert rc == 0 and "Traceback" not in err
    [report] = json.loads(report_path.read_text())
    settings = [(e["threshold"], e["exit_layers"], e["exit_offsets"], e["simulated"]) for e in report["thresholds"]]
    assert settings == [(t, [2, 3], [0.1, 0.0], sim) for t in (0.5, 0.9) for sim in (False, True)]
    assert "0.5 (exits 2@0.6,3@0.5)" in out


@pytest.mark.parametrize("options, message", [
    (["--exit-offsets", "0.1"], "--exit-offsets needs --exits"),
    (["--exits", "2,9"], "no trained head"),
    (["--exits", "2,3", "--exit-offsets", "0.1"], "1 exit offsets for 2 exits"),
    (["--exits", "two"], "--exits must be comma-separated ints"),
])
def test_evaluate_bad_exits(capsys, tiny_checkpoint, data, options, message):
    rc, _, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", data, "--limit", "2",
                     "--device", "cpu", *options)
    assert rc != 0
    assert_one_line_error(err, "capeen evaluate: error:", message)


def test_evaluate_writes_a_json_report(capsys, tiny_checkpoint, data, tmp_path):
    report_path = tmp_path / "report.json"
    rc, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", data, "--limit", "2",
                       "--mode", "sweep", "--thresholds", "0.5,0.9", "--distortion", "none",
                       "--distortion", "blur:1", "--agreement", "--json", report_path, "--device", "cpu")
    assert rc == 0 and "Traceback" not in err
    reports = json.loads(report_path.read_text())
    assert [r["distortion"] for r in reports] == ["none", "blur:1"]
    for report in reports:
        assert report["images"] == 2 and report["checkpoint"] == "tiny-test"
        assert report["full"]["mean_exit_layer"] == N_LAYER
        assert [e["threshold"] for e in report["thresholds"]] == [0.5, 0.9]
        assert sorted(report["exit_agreement"]) == ["1", "2", "3"]


def test_bench_compares_hf_full_and_early_exit_and_splits_encoder_from_decoder(capsys, tiny_checkpoint, data,
                                                                                  tmp_path):
    report_path = tmp_path / "bench.json"
    rc, out, err = run(capsys, "bench", "--checkpoint", tiny_checkpoint, "--data", data, "--split", "test",
                       "--batch-sizes", "1,2", "--images", "4", "--min-batches", "1", "--json", report_path,
                       "--device", "cpu")
    assert rc == 0 and "Traceback" not in err
    report = json.loads(report_path.read_text())
    assert [r["batch_size"] for r in report["runs"]] == [1, 2]
    for r in report["runs"]:
        assert r["hf_and_full_identical_captions"] == 1.0  # the same weights give the same greedy captions
        for name in ("capeen-full", "capeen-early-exit@0.6"):
            assert r[name]["encode_ms_per_image"] > 0 and r[name]["decode_ms_per_caption"] > 0
            # encoder + decoder is the caption's time, less what lies around them (tensor moves, sync)
            assert r[name]["encode_ms_per_image"] + r[name]["decode_ms_per_caption"] <= r[name]["ms_per_caption"]
        assert "encode_ms_per_image" not in r["hf-generate"]
    assert "encoder" in out and "against batch 1" in out
    assert report["head_cost"]["decoder_layer_us"] > 0
    # where decode time goes, per batch size: timed sections, what lies around them, and their total
    profiles = report["profile_ms_per_caption"]
    assert list(profiles) == ["1", "2"]
    for profile in profiles.values():
        assert profile["decoder layers"] > 0 and profile["cross-attention keys and values"] > 0
        total = profile.pop("total decode")
        assert total > 0 and sum(profile.values()) == pytest.approx(total)
    assert "by batch size" in out and "batch 2" in out


def test_bench_compare_kernels_reports_what_onednn_buys(capsys, tiny_checkpoint, data, tmp_path):
    from models import kernels

    report_path = tmp_path / "bench.json"
    rc, out, err = run(capsys, "bench", "--checkpoint", tiny_checkpoint, "--data", data, "--split", "test",
                       "--batch-sizes", "2", "--images", "4", "--min-batches", "1", "--compare-kernels",
                       "--json", report_path, "--device", "cpu")
    assert rc == 0 and "Traceback" not in err
    report = json.loads(report_path.read_text())
    run_report = report["runs"][0]
    for name in ("capeen-full", "capeen-early-exit@0.6"):
        assert all(run_report[f"{name}/{side}"]["ms_per_caption"] > 0 for side in ("mkl-only", "onednn"))
        assert run_report["onednn_speedup"][name] > 0
        assert run_report["onednn_identical_captions"][name] == 1.0  # the kernels must not change a caption
    # where this machine's large products went, and why
    large_on = report["kernels"]["large_products_on"]
    assert large_on == ("onednn" if kernels.onednn_active() else "mkl")
    assert f"large CPU products on {'oneDNN' if large_on == 'onednn' else 'MKL'}" in out
    if kernels.onednn_available():
        assert report["kernels"]["onednn_gain"] > 0
        crossover = report["kernel_crossover"]
        assert {row["picked"] for row in crossover} == ({"mkl", "onednn"} if large_on == "onednn" else {"mkl"})
        assert all(row["mkl_us"] > 0 and row["onednn_us"] > 0 for row in crossover)
        assert "MKL against oneDNN" in out


def test_bench_with_too_few_images_for_a_batch_size_is_one_line(capsys, tiny_checkpoint, data, monkeypatch):
    rc, _, err = run(capsys, "bench", "--checkpoint", tiny_checkpoint, "--data", data, "--split", "val",
                     "--batch-sizes", "1,4", "--device", "cpu")
    assert rc == 2
    assert_one_line_error(err, "batch size 4 needs at least 12 images", "the val split has 4 images")
    import models.bench  # another problem of the measurement is not blamed on the split's size

    def fails(*args, **kwargs):
        raise ValueError("the model cannot decode these images")

    monkeypatch.setattr(models.bench, "measure", fails)
    rc, _, err = run(capsys, "bench", "--checkpoint", tiny_checkpoint, "--data", data, "--split", "val",
                     "--batch-sizes", "1", "--device", "cpu")
    assert rc == 2 and "split has" not in err
    assert_one_line_error(err, "the model cannot decode these images")


@pytest.mark.parametrize("argv, fragment", [
    (["caption", "{a}", "--device", "gpu0"], "--device gpu0: use auto, cpu, cuda or cuda:N"),
    (["caption", "{a}", "--device", "meta"], "--device meta: use auto, cpu, cuda or cuda:N"),
    (["evaluate", "--data", "{data}", "--json", "/no/such/folder/report.json"],
     "folder /no/such/folder does not exist"),
    (["evaluate", "--data", "{data}", "--plot", "{tmp}/sweep.png"], "--plot needs --mode sweep"),
    (["evaluate", "--data", "{data}", "--mode", "sweep", "--plot", "{tmp}"], "is a directory"),
    (["bench", "--data", "{data}", "--json", "/no/such/folder/bench.json"], "folder /no/such/folder does not exist"),
    (["bench", "--data", "{data}", "--images", "-1"], "--images must be at least 1"),
    (["bench", "--data", "{data}", "--batch-sizes", "1,1"], "--batch-sizes lists a size twice"),
    # the largest batch is checked against the split before the smaller ones are measured, not after
    (["bench", "--data", "{data}", "--batch-sizes", "1,1000"], "batch size 1000 needs at least 3000 images"),
    (["evaluate", "--data", "{data}", "--threads", "-5"], "--threads must be at least 1"),
    (["evaluate", "--data", "{data}", "--mode", "full", "--simulated-exits"],
     "--simulated-exits cannot be used with --mode full"),
    (["caption", "{a}", "--engines", "0"], "--engines must be at least 1, got 0"),
    (["caption", "{a}", "--threshold", "1.5"], "--threshold must be in (0, 1], got 1.5"),
], ids=["unknown-device", "torch-device-not-ours", "evaluate-json-nowhere", "plot-without-sweep", "plot-into-a-folder",
        "bench-json-nowhere", "negative-images", "repeated-batch-size", "batch-larger-than-the-split",
        "negative-threads", "simulated-exits-at-full-depth", "no-engines", "threshold-above-1"])
def test_bad_output_and_device_options_are_refused_before_any_work(capsys, tiny_checkpoint, images, data, tmp_path,
                                                                    monkeypatch, argv, fragment):
    import models.evaluation

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation ran before the options were checked")

    monkeypatch.setattr(models.evaluation, "evaluate_thresholds", no_work)
    monkeypatch.setattr("models.bench.measure", no_work)
    values = {"a": images["a.png"], "data": data, "tmp": tmp_path}
    rc, out, err = run(capsys, *[part.format(**values) for part in argv], "--checkpoint", tiny_checkpoint)
    assert rc == 2
    assert_one_line_error(err, fragment)


@pytest.mark.parametrize("mode, option", [
    ("full", ["--threshold", "0.5"]), ("full", ["--exits", "1,2"]), ("full", ["--thresholds", "0.5,0.7"]),
    ("fixed", ["--thresholds", "0.5,0.7"]), ("sweep", ["--threshold", "0.5"]),
])
def test_evaluate_refuses_an_option_its_mode_would_ignore(capsys, tiny_checkpoint, data, monkeypatch, mode, option):
    # `--mode full --threshold 0.5` printed a full-depth report as if it had answered for 0.5
    import models.evaluation

    monkeypatch.setattr(models.evaluation, "evaluate_thresholds", lambda *a, **k: pytest.fail("decoded anyway"))
    rc, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--data", data, "--mode", mode, *option)
    assert rc == 2 and out == ""
    assert_one_line_error(err, f"{option[0]} cannot be used with --mode {mode}")


def test_evaluate_compare_checks_every_checkpoint_before_decoding(capsys, tiny_checkpoint, data, tmp_path,
                                                                   monkeypatch):
    # a compared checkpoint without a calibrated threshold failed only after the first one's whole evaluation,
    # without naming itself, and the --json report of the finished part was lost
    import models.evaluation

    uncalibrated = make_tiny_checkpoint(tmp_path / "uncalibrated", threshold=None)
    monkeypatch.setattr(models.evaluation, "evaluate_thresholds", lambda *a, **k: pytest.fail("decoded anyway"))
    rc, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--compare", uncalibrated,
                       "--data", data, "--mode", "fixed", "--json", tmp_path / "report.json")
    assert rc == 2 and out == ""
    assert_one_line_error(err, f"{uncalibrated}: ", "no calibrated threshold")


@pytest.mark.parametrize("field, value, fragment", [
    ("bos_token_id", 999, "bos_token_id must be a token id"),
    ("eos_token_id", -1, "eos_token_id must be a token id"),
    ("layer_norm_epsilon", "x", "layer_norm_epsilon must be a small positive number"),
])
def test_impossible_model_config_values_are_one_line(capsys, tiny_checkpoint, images, tmp_path, field, value,
                                                     fragment):
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    config = json.loads((directory / "config.json").read_text())
    config["model"][field] = value
    (directory / "config.json").write_text(json.dumps(config))
    rc, out, err = run(capsys, "caption", images["a.png"], "--checkpoint", directory)
    assert rc == 2 and out == ""
    assert_one_line_error(err, "capeen caption: error:", fragment)


def test_a_report_is_written_through_a_link_with_its_permissions_and_in_place_into_a_pipe(tmp_path) -> None:
    """The report is written beside its file and renamed over it; that must not replace a link with a file, make
    a private report readable by all, or replace a named pipe (or /dev/stdout) with a file."""
    import threading

    from capeen import outputs

    volume = tmp_path / "volume"
    volume.mkdir()
    report, link = volume / "report.json", tmp_path / "report.json"
    report.write_text("old")
    report.chmod(0o600)
    link.symlink_to(report)
    outputs.write_text("--json", link, "new\n")
    assert link.is_symlink() and report.read_text() == "new\n" and (report.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in volume.iterdir()) == ["report.json"]

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()))
    reader.start()
    assert outputs.output_file_problem(pipe) is None
    outputs.write_text("--json", pipe, "through the pipe\n")
    reader.join(10)
    assert received == ["through the pipe\n"] and stat.S_ISFIFO(pipe.stat().st_mode)
    long_name = tmp_path / ("r" * 250)  # a valid name, near the limit: no longer once a temporary's suffix is added
    assert outputs.output_file_problem(long_name) is None
    outputs.write_text("--json", long_name, "{}")
    assert long_name.read_text() == "{}"


def test_evaluate_meteor_without_java_is_refused_not_left_out(capsys, tiny_checkpoint, data, monkeypatch):
    monkeypatch.setattr("models.commands.shutil.which", lambda name: None)
    rc, out, err = run(capsys, "evaluate", "--data", data, "--checkpoint", tiny_checkpoint, "--meteor")
    assert rc == 2 and out == ""
    assert_one_line_error(err, "--meteor needs Java")


def test_bench_and_calibrate_run_on_a_model_made_for_short_captions(capsys, data, tmp_path):
    """A model of 8 positions: the cost of a layer step was measured at position 12 of the KV cache."""
    from models.bench import head_cost
    from models.checkpoint import Checkpoint, Thresholds, load_checkpoint, save_checkpoint
    from models.engine import CaptionEngine
    from models.model import CapeenModel
    from tests.conftest import tiny_config

    tokenizer = load_checkpoint(make_tiny_checkpoint(tmp_path / "tiny")).tokenizer
    short = save_checkpoint(Checkpoint(model=CapeenModel(tiny_config(len(tokenizer), n_positions=8)).eval(),
                                       tokenizer=tokenizer, thresholds=Thresholds(threshold=0.6),
                                       meta={"name": "short"}), tmp_path / "short")
    costs = head_cost(CaptionEngine.from_checkpoint(short, device="cpu"), repeats=5)
    assert all(value > 0 for value in costs.values())
    rc, _, err = run(capsys, "calibrate", "--checkpoint", short, "--data", data, "--thresholds", "0.5",
                     "--no-schedules", "--device", "cpu")
    assert rc in (0, 1) and "Traceback" not in err  # 1: no setting qualified, which a random model may find


def test_an_endless_file_is_refused_not_read_into_memory(capsys, tiny_checkpoint, images, monkeypatch):
    import models.images

    monkeypatch.setattr(models.images, "MAX_FILE_BYTES", 2**20)  # the real limit is 512 MiB
    rc, out, err = run(capsys, "caption", images["a.png"], "/dev/zero", "--checkpoint", tiny_checkpoint)
    assert rc == 1 and out.startswith(f"{images['a.png']}\t")  # the good image is still captioned
    assert_one_line_error(err, "/dev/zero: larger than 1 MiB")


# ----- as a real process ----------------------------------------------------------------------------------------
def test_a_reader_that_stops_early_gets_no_traceback(tiny_checkpoint, images):
    """`capeen caption *.png | head -1`: head leaves after one line, and capeen stops quietly."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "capeen", "caption", *[str(images["a.png"])] * 400, "--batch-size", "1",
               "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    proc.stdout.readline()
    proc.stdout.close()  # as head does once it has its line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_the_output_is_one_line(tiny_checkpoint, images):
    """`capeen caption photos/ > captions.txt` on a disk that fills up: what failed, in one line, exit 2."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "capeen", "caption", str(images["a.png"]), "--checkpoint",
                               str(tiny_checkpoint), "--device", "cpu"], stdout=full, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "capeen caption: error: No space left on device\n"


def test_python_m_capeen_caption_as_a_subprocess(tiny_checkpoint, images):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "capeen", "caption", str(images["a.png"]), str(images["truncated.png"]),
         "--checkpoint", str(tiny_checkpoint), "--json", "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert_one_line_error(proc.stderr, "capeen caption:", str(images["truncated.png"]))
    (item,) = json.loads(proc.stdout)
    assert item["image"] == str(images["a.png"])
    assert len(item["tokens"]) == len(item["exit_layers"]) == len(item["confidences"])


def test_the_cli_offers_every_way_the_decoder_fills_keys_and_values():
    from capeen.options import KV_FILLS as CLI_KV_FILLS
    from models.decoding import KV_FILLS

    assert CLI_KV_FILLS == KV_FILLS
