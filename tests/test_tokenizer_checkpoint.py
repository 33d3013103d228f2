"""Vocabulary files and checkpoint directories: what a user saves is what a user loads, and nothing else loads.

A checkpoint is the unit users copy around and point `capeen` at, so a broken one must be refused with one line
naming the file (a `CheckpointError`), and loading must never unpickle (safetensors + JSON only).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import (
    CONFIG_FILE,
    THRESHOLDS_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    CheckpointError,
    Thresholds,
    load_checkpoint,
    save_checkpoint,
)
from models.model import CapeenModel
from models.tokenizer import SPECIALS, WordTokenizer
from tests.conftest import tiny_config

CAPTIONS = [
    ["a", "red", "circle"],
    ["two", "blue", "squares"],
    ["a", "blue", "circle", "and", "a", "red", "square"],
    ["a", "green", "star"],
]


# ----- tokenizer ------------------------------------------------------------------------------------------------
def test_build_orders_by_frequency_then_alphabet_whatever_the_caption_order():
    tok = WordTokenizer.build(CAPTIONS)
    again = WordTokenizer.build(list(reversed(CAPTIONS)))
    assert tok.words == again.words
    assert tok.words[: len(SPECIALS)] == list(SPECIALS)
    # "a" x4, then "blue"/"circle"/"red" x2 (alphabetical), then the singletons alphabetically
    assert tok.words[4:] == ["a", "blue", "circle", "red", "and", "green", "square", "squares", "star", "two"]


def test_build_min_count_drops_rare_words_and_never_duplicates_specials():
    tok = WordTokenizer.build([*CAPTIONS, ["<unk>", "<eos>", "a"]], min_count=2)
    assert tok.words == [*SPECIALS, "a", "blue", "circle", "red"]


def test_encode_wraps_in_bos_eos_and_maps_unknown_words_to_unk():
    tok = WordTokenizer.build(CAPTIONS)
    ids = tok.encode(["a", "purple", "circle"])
    assert ids == [tok.bos_id, tok.index["a"], tok.unk_id, tok.index["circle"], tok.eos_id]


@pytest.mark.parametrize("max_len", [3, 4, 5])
def test_encode_truncates_to_max_len_and_keeps_the_eos(max_len):
    tok = WordTokenizer.build(CAPTIONS)
    words = ["a", "blue", "circle", "and", "a", "red", "square"]
    ids = tok.encode(words, max_len=max_len)
    assert len(ids) == max_len
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == words[: max_len - 2]


def test_encode_shorter_than_max_len_is_not_padded_or_cut():
    tok = WordTokenizer.build(CAPTIONS)
    assert tok.encode(["a"], max_len=10) == [tok.bos_id, tok.index["a"], tok.eos_id]


def test_decode_stops_at_the_first_eos_and_drops_special_tokens():
    tok = WordTokenizer.build(CAPTIONS)
    a, red, circle = (tok.index[w] for w in ("a", "red", "circle"))
    ids = [tok.bos_id, a, tok.unk_id, red, tok.pad_id, circle, tok.eos_id, a, red]
    assert tok.decode(ids) == ["a", "red", "circle"]
    assert tok.decode([tok.eos_id, a]) == []


def test_words_until_eos_shows_specials_as_themselves():
    tok = WordTokenizer.build(CAPTIONS)
    a, red = tok.index["a"], tok.index["red"]
    assert tok.words_until_eos([a, tok.unk_id, red, tok.eos_id, a]) == ["a", "<unk>", "red"]
    assert tok.words_until_eos([a, red]) == ["a", "red"]  # no EOS: everything


def test_save_load_round_trip(tmp_path):
    tok = WordTokenizer.build(CAPTIONS)
    tok.save(tmp_path / "vocab.json")
    loaded = WordTokenizer.load(tmp_path / "vocab.json")
    assert loaded.words == tok.words
    assert loaded.encode(["a", "green", "star"]) == tok.encode(["a", "green", "star"])
    assert len(loaded) == len(tok)


@pytest.mark.parametrize("content", [
    '["<pad>", "<bos>", "<eos>", "<unk>", "a"]',  # a bare list
    '{"vocab": ["<pad>", "<bos>", "<eos>", "<unk>"]}',  # no "words"
    '{"words": "a b c"}',  # not a list
    '{"words": ["a", "<pad>", "<bos>", "<eos>", "<unk>"]}',  # specials not first
    '{"words": ["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"]}',  # duplicate
])
def test_load_rejects_malformed_vocab_files(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        WordTokenizer.load(path)


def test_load_rejects_invalid_json(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text('{"words": [')
    with pytest.raises(ValueError):  # json.JSONDecodeError is a ValueError
        WordTokenizer.load(path)


# ----- checkpoint round trip ------------------------------------------------------------------------------------
def _inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, config.image_size, config.image_size, generator=g) * 2 - 1
    tokens = torch.randint(0, config.vocab_size, (2, 7), generator=g)
    return pixels, tokens


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A freshly initialised model saved to disk, with its logits on fixed inputs."""
    torch.manual_seed(7)
    tok = WordTokenizer.build(CAPTIONS)
    model = CapeenModel(tiny_config(len(tok))).eval()
    pixels, tokens = _inputs(model.config)
    with torch.no_grad():
        final, exits = model(pixels, tokens)
    ckpt = Checkpoint(model=model, tokenizer=tok, thresholds=Thresholds(threshold=0.75, sweep=[{"threshold": 0.75}]),
                      meta={"name": "round-trip", "extra": [1, 2]})
    directory = save_checkpoint(ckpt, tmp_path_factory.mktemp("ckpt") / "model")
    return directory, tok, (pixels, tokens), (final, exits)


def test_save_load_round_trip_gives_identical_logits(saved):
    directory, tok, (pixels, tokens), (final, exits) = saved
    torch.manual_seed(12345)  # the loaded model's fresh init differs from the saved one: weights must come from disk
    ckpt = load_checkpoint(directory)
    assert not ckpt.model.training
    with torch.no_grad():
        final2, exits2 = ckpt.model(pixels, tokens)
    assert torch.equal(final, final2)
    assert sorted(exits2) == sorted(exits) == [1, 2, 3]
    for layer in exits:
        assert torch.equal(exits[layer], exits2[layer])
    # lm_head is not stored: it must be tied to the loaded embedding again
    assert ckpt.model.decoder.lm_head.weight.data_ptr() == ckpt.model.decoder.transformer.wte.weight.data_ptr()
    assert ckpt.tokenizer.words == tok.words
    assert ckpt.thresholds.threshold == 0.75 and ckpt.thresholds.sweep == [{"threshold": 0.75}]
    assert ckpt.name == "round-trip" and ckpt.meta["extra"] == [1, 2]
    assert ckpt.model.config == tiny_config(len(tok))


def test_checkpoint_files_are_json_and_safetensors(saved):
    directory = saved[0]
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE,
                                                                  THRESHOLDS_FILE])
    for name in (CONFIG_FILE, VOCAB_FILE, THRESHOLDS_FILE):
        json.loads((directory / name).read_text())
    state = load_file(str(directory / WEIGHTS_FILE))
    assert "decoder.lm_head.weight" not in state  # tied copy is not stored
    assert "decoder.transformer.wte.weight" in state


def test_checkpoint_files_are_readable_by_other_users(saved):
    """A checkpoint copied into the container is read by its service user, not by the one who trained it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in saved[0].iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_an_interrupted_save_leaves_the_old_checkpoint_whole(saved, tmp_path, monkeypatch):
    import models.checkpoint

    directory = shutil.copytree(saved[0], tmp_path / "model")
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    ckpt = load_checkpoint(directory)
    ckpt.thresholds = Thresholds(threshold=0.5)
    ckpt.meta = {**ckpt.meta, "name": "retrained"}  # every file of the new one differs from the old one's

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the weights are being written

    monkeypatch.setattr(models.checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, directory)
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before  # and no temporary files


def test_load_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_checkpoint must not unpickle")

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.serialization, "load")]:
        monkeypatch.setattr(target, name, refuse)
    directory, _, (pixels, tokens), (final, _) = saved
    ckpt = load_checkpoint(directory)
    with torch.no_grad():
        assert torch.equal(ckpt.model(pixels, tokens)[0], final)


def test_missing_thresholds_file_means_uncalibrated(saved, tmp_path):
    directory = shutil.copytree(saved[0], tmp_path / "ck")
    (directory / THRESHOLDS_FILE).unlink()
    ckpt = load_checkpoint(directory)
    assert ckpt.thresholds.threshold is None and ckpt.thresholds.sweep == []


# ----- broken checkpoints ---------------------------------------------------------------------------------------
def _edit_json(name, change):
    def mutate(directory):
        path = directory / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return mutate


def _write(name, data: bytes):
    def mutate(directory):
        (directory / name).write_bytes(data)
    return mutate


def _truncate_weights(directory):
    path = directory / WEIGHTS_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _cut_header(directory):
    path = directory / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:20])


def _wrong_shape(directory):
    path = directory / WEIGHTS_FILE
    state = load_file(str(path))
    state["decoder.transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 65)
    save_file(state, str(path))


def _missing_tensor(directory):
    path = directory / WEIGHTS_FILE
    state = load_file(str(path))
    del state["exits.2.proj.weight"]
    save_file(state, str(path))


def _extra_tensor(directory):
    path = directory / WEIGHTS_FILE
    state = load_file(str(path))
    state["exits.4.proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(path))


def _non_finite_tensor(directory):  # what a diverged training leaves
    path = directory / WEIGHTS_FILE
    state = load_file(str(path))
    state["decoder.transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    save_file(state, str(path))


def _remove(name):
    def mutate(directory):
        (directory / name).unlink()
    return mutate


BROKEN = {
    "missing config.json": (_remove(CONFIG_FILE), CONFIG_FILE),
    "config.json invalid JSON": (_write(CONFIG_FILE, b'{"model": {'), CONFIG_FILE),
    "config.json not UTF-8": (_write(CONFIG_FILE, b"\xff\xfe\x00{"), CONFIG_FILE),
    "config.json a list": (_write(CONFIG_FILE, b"[1, 2]"), CONFIG_FILE),
    # a folder that is not a capeen checkpoint was taken for one of the default config, and vocab.json blamed
    "config.json without a model": (_write(CONFIG_FILE, b"{}"), CONFIG_FILE),
    "a Hugging Face config.json": (_write(CONFIG_FILE, b'{"model_type": "vision-encoder-decoder"}'), CONFIG_FILE),
    "unknown config key": (_edit_json(CONFIG_FILE, lambda c: c["model"].update(n_layers=4)), CONFIG_FILE),
    "exit layer beyond the decoder": (_edit_json(CONFIG_FILE, lambda c: c["model"].update(exit_layers=[1, 9])),
                                      CONFIG_FILE),
    "config value of the wrong type": (_edit_json(CONFIG_FILE, lambda c: c["model"].update(exit_layers=3)),
                                       CONFIG_FILE),
    "vocab size mismatch": (_edit_json(VOCAB_FILE, lambda v: v["words"].append("zebra")), VOCAB_FILE),
    "missing vocab.json": (_remove(VOCAB_FILE), VOCAB_FILE),
    "vocab.json without specials": (_edit_json(VOCAB_FILE, lambda v: v["words"].reverse()), VOCAB_FILE),
    "missing model.safetensors": (_remove(WEIGHTS_FILE), WEIGHTS_FILE),
    "empty model.safetensors": (_write(WEIGHTS_FILE, b""), WEIGHTS_FILE),
    "corrupt model.safetensors": (_write(WEIGHTS_FILE, os.urandom(4096)), WEIGHTS_FILE),
    "model.safetensors is a pickle": (_write(WEIGHTS_FILE, pickle.dumps({"a": 1})), WEIGHTS_FILE),
    "truncated model.safetensors": (_truncate_weights, WEIGHTS_FILE),
    "model.safetensors cut inside its header": (_cut_header, WEIGHTS_FILE),
    "tensor with the wrong shape": (_wrong_shape, WEIGHTS_FILE),
    "tensor missing": (_missing_tensor, WEIGHTS_FILE),
    "unexpected tensor": (_extra_tensor, WEIGHTS_FILE),
    "tensor with a NaN": (_non_finite_tensor, WEIGHTS_FILE),
    "threshold 1.7": (_write(THRESHOLDS_FILE, b'{"threshold": 1.7}'), THRESHOLDS_FILE),
    "threshold 0": (_write(THRESHOLDS_FILE, b'{"threshold": 0}'), THRESHOLDS_FILE),
    "threshold a string": (_write(THRESHOLDS_FILE, b'{"threshold": "0.5"}'), THRESHOLDS_FILE),
    "thresholds.json invalid JSON": (_write(THRESHOLDS_FILE, b"{"), THRESHOLDS_FILE),
    "exit offsets not one per exit": (
        _write(THRESHOLDS_FILE, b'{"threshold": 0.5, "exit_layers": [1, 2], "exit_offsets": [0.1]}'), THRESHOLDS_FILE),
    "unknown kv_fill": (_write(THRESHOLDS_FILE, b'{"threshold": 0.5, "kv_fill": "exact"}'), THRESHOLDS_FILE),
    "exit offsets without exits": (_write(THRESHOLDS_FILE, b'{"threshold": 0.5, "exit_offsets": [0.1]}'),
                                   THRESHOLDS_FILE),
    "an exit given twice with offsets": (
        _write(THRESHOLDS_FILE, b'{"threshold": 0.5, "exit_layers": [1, 1], "exit_offsets": [0, 0.1]}'),
        THRESHOLDS_FILE),
    "exit offset a string": (
        _write(THRESHOLDS_FILE, b'{"threshold": 0.5, "exit_layers": [1], "exit_offsets": ["0.1"]}'), THRESHOLDS_FILE),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_is_one_line_checkpoint_error_naming_the_file(tiny_checkpoint, tmp_path, case):
    mutate, filename = BROKEN[case]
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    mutate(directory)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert str(directory / filename) in message
    assert "\n" not in message


def test_missing_directory_is_checkpoint_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("state", ["train_state.json", "last/train_state.json", "backbone/last/train_state.json"])
def test_a_training_runs_state_folder_is_named_as_such(tmp_path, state):
    (tmp_path / state).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / state).write_text(json.dumps({"out": "/models/mine"}))
    with pytest.raises(CheckpointError, match="the resumable state of a training run .*: its checkpoint is "
                                              "/models/mine$"):
        load_checkpoint(tmp_path)
    (tmp_path / state).write_text("{")  # damaged: still named, without the checkpoint's place
    with pytest.raises(CheckpointError, match="the checkpoint is the folder the run's --out named$"):
        load_checkpoint(tmp_path)


def test_an_empty_path_is_not_taken_for_the_current_folder():
    with pytest.raises(CheckpointError, match="empty path"):
        load_checkpoint("")


def test_a_model_too_large_to_build_is_a_checkpoint_error_naming_its_config(tiny_checkpoint, monkeypatch):
    def out_of_memory(config):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("models.checkpoint.CapeenModel", out_of_memory)
    with pytest.raises(CheckpointError, match=r"config\.json: cannot build the model it describes \(\[enforce"):
        load_checkpoint(tiny_checkpoint)


def test_a_file_instead_of_a_directory_is_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)


# Malformed values (not just malformed files) must also be one-line CheckpointErrors, never tracebacks.
MALFORMED_VALUES = {
    "n_head 0": (
        _edit_json(CONFIG_FILE, lambda c: c["model"].update(n_head=0)), CONFIG_FILE),
    "negative n_embd": (
        _edit_json(CONFIG_FILE, lambda c: c["model"].update(n_embd=-32)), CONFIG_FILE),
    "thresholds.json sweep not a list": (
        _write(THRESHOLDS_FILE, b'{"threshold": 0.5, "sweep": 5}'), THRESHOLDS_FILE),
}


@pytest.mark.parametrize("case", list(MALFORMED_VALUES))
def test_malformed_values_are_checkpoint_errors_too(tiny_checkpoint, tmp_path, case):
    mutate, filename = MALFORMED_VALUES[case]
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    mutate(directory)
    with pytest.raises(CheckpointError, match=filename.replace(".", r"\.")):
        load_checkpoint(directory)
