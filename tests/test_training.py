"""Two-stage training through `capeen train` on a tiny synthetic data set and a tiny model.

What a user relies on: stage encoder pre-trains only the image encoder, and stage backbone starts from it;
stage backbone learns; stage exits trains only the exit heads (with distillation, or CE only), starting from
copies of the final head or, with --keep-exits, from the init checkpoint's heads; --exit-aware trains exits as
auxiliary losses; a stopped run resumes to exactly the same weights; run state and checkpoints are
safetensors + JSON, never pickle.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
import os
import pickle
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capeen.cli import main
from models.checkpoint import load_checkpoint
from models.model import CapeenConfig, CapeenModel
from models.synthetic import generate_dataset
from models import train as train_module
from models.train import Trainer
from models.training_data import build_tokenizer

TINY = {"image_size": 32, "patch_size": 8, "encoder_hidden": 32, "encoder_layers": 1, "encoder_heads": 2,
        "encoder_intermediate": 64, "n_positions": 32, "n_embd": 32, "n_layer": 4, "n_head": 2, "n_inner": 64,
        "exit_layers": [1, 2, 3]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_dataset(out, 24, 8, 4, seed=0, image_size=32, workers=1)
    return out


def _train(data, out, run_dir, *extra) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--run-dir", str(run_dir), "--device", "cpu",
                 "--batch-size", "8", "--captions-per-image", "2", "--seed", "0", *map(str, extra)])


def _meta(checkpoint_dir) -> dict:
    return json.loads((checkpoint_dir / "config.json").read_text())


def _weights(checkpoint_dir) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def backbone(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("backbone")
    rc = _train(data, root / "ckpt", root / "run", "--stage", "backbone", "--steps", 40, "--lr", "3e-3",
                "--warmup", 5, "--eval-every", 4, "--model-config", json.dumps(TINY))
    assert rc == 0
    return root / "ckpt", root / "run"


@pytest.fixture(scope="module")
def exits_distilled(data, backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("exits")
    rc = _train(data, root / "ckpt", root / "run", "--stage", "exits", "--init", backbone[0], "--steps", 12,
                "--lr", "3e-3", "--warmup", 2, "--eval-every", 3)
    assert rc == 0
    return root / "ckpt"


# ----- stage backbone -------------------------------------------------------------------------------------------
def test_backbone_training_loss_falls(backbone):
    history = _meta(backbone[0])["training"]["backbone"]["history"]
    assert [r["step"] for r in history] == list(range(4, 41, 4))
    first = sum(r["loss"] for r in history[:3]) / 3
    last = sum(r["loss"] for r in history[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert history[-1]["val_final_ce"] < history[0]["val_final_ce"] - 0.3
    # the plain backbone stage does not train or report the exits
    assert all("val_exit_ce" not in r and "val_exit_kl" not in r for r in history)


def test_backbone_checkpoint_loads_with_the_requested_config(backbone, data):
    ckpt = load_checkpoint(backbone[0])
    for key, value in TINY.items():
        assert getattr(ckpt.model.config, key) == value
    assert ckpt.tokenizer.words == build_tokenizer(data).words
    assert ckpt.model.config.vocab_size == len(ckpt.tokenizer)
    assert ckpt.thresholds.threshold is None  # new weights start uncalibrated
    assert ckpt.name == "ckpt"
    options = ckpt.meta["training"]["backbone"]
    assert options["steps"] == 40 and options["stage"] == "backbone" and options["model_overrides"] == TINY


def test_run_state_is_safetensors_and_json_only(backbone):
    last = backbone[1] / "last"
    assert sorted(p.name for p in last.iterdir()) == ["state.safetensors", "train_state.json"]
    info = json.loads((last / "train_state.json").read_text())
    assert info["step"] == 40
    tensors = load_file(str(last / "state.safetensors"))
    assert any(k.startswith("optim.") for k in tensors) and "rng.torch" in tensors
    for path in [*last.iterdir(), *backbone[0].iterdir()]:  # a pickle or torch.save archive parses as neither
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".safetensors", f"unexpected file {path}"
            load_file(str(path))


# ----- stage exits ----------------------------------------------------------------------------------------------
def _assert_only_exits_changed(before: dict, after: dict):
    assert before.keys() == after.keys()
    exit_keys = [k for k in before if k.startswith("exits.")]
    assert exit_keys
    for key in before:
        if key.startswith("exits."):
            continue
        assert torch.equal(before[key], after[key]), f"stage exits changed backbone weight {key}"
    # the heads start as copies of the final head; training must move them away from both start points
    final_head = after["decoder.transformer.wte.weight"]
    for layer in ("1", "2", "3"):
        proj = after[f"exits.{layer}.proj.weight"]
        assert not torch.equal(proj, before[f"exits.{layer}.proj.weight"])
        assert not torch.allclose(proj, final_head, atol=1e-4)


def test_stage_exits_freezes_backbone_and_trains_exits(backbone, exits_distilled):
    _assert_only_exits_changed(_weights(backbone[0]), _weights(exits_distilled))


def test_stage_exits_keeps_a_conv_stems_batchnorm_statistics(data, tmp_path, capsys):
    stem = {**TINY, "stem_channels": [8], "patch_size": 4}
    assert _train(data, tmp_path / "backbone", tmp_path / "run1", "--stage", "backbone", "--steps", 4,
                  "--warmup", 1, "--eval-every", 4, "--model-config", json.dumps(stem)) == 0
    assert _train(data, tmp_path / "exits", tmp_path / "run2", "--stage", "exits", "--init", tmp_path / "backbone",
                  "--steps", 4, "--lr", "3e-3", "--warmup", 1, "--eval-every", 2) == 0
    out = capsys.readouterr().out  # new exits have no threshold yet, whatever --out held before
    assert f"capeen calibrate --checkpoint {tmp_path / 'exits'} --data {data}" in out
    before, after = _weights(tmp_path / "backbone"), _weights(tmp_path / "exits")
    assert "encoder.stem.1.running_mean" in before
    _assert_only_exits_changed(before, after)


def test_stage_exits_reports_distillation_and_keeps_backbone_history(exits_distilled):
    meta = _meta(exits_distilled)
    assert set(meta["training"]) == {"backbone", "exits"}
    opts = meta["training"]["exits"]
    history = opts["history"]
    assert len(history) == 4
    for record in history:
        assert {"val_exit_ce", "val_exit_kl", "val_final_ce", "val_loss"} <= set(record)
        expected = (1 - opts["alpha"]) * record["val_exit_ce"] + \
            opts["alpha"] * opts["temperature"] ** 2 * record["val_exit_kl"]
        assert record["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert history[-1]["val_loss"] < history[0]["val_loss"], history  # the exits learn
    # the frozen backbone's own loss does not move
    assert len({round(r["val_final_ce"], 6) for r in history}) == 1


def test_stage_exits_ce_only(data, backbone, tmp_path):
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "exits", "--init", backbone[0],
                  "--steps", 6, "--lr", "3e-3", "--warmup", 1, "--eval-every", 3, "--ce-only") == 0
    _assert_only_exits_changed(_weights(backbone[0]), _weights(tmp_path / "ckpt"))
    history = _meta(tmp_path / "ckpt")["training"]["exits"]["history"]
    for record in history:
        assert "val_exit_kl" not in record
        assert record["val_loss"] == pytest.approx(record["val_exit_ce"], rel=1e-6)


@pytest.mark.parametrize("keep", [True, False])
def test_stage_exits_starts_from_the_init_heads_only_with_keep_exits(data, exits_distilled, tmp_path, keep):
    # with lr 0 nothing moves, so the exported heads are exactly where stage exits started them
    extra = ["--keep-exits"] if keep else []
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "exits", "--init", exits_distilled,
                  "--steps", 2, "--lr", "0", "--warmup", 1, "--eval-every", 2, *extra) == 0
    init, after = _weights(exits_distilled), _weights(tmp_path / "ckpt")
    for layer in ("1", "2", "3"):
        proj = after[f"exits.{layer}.proj.weight"]
        assert torch.equal(proj, init[f"exits.{layer}.proj.weight"]) == keep
        assert torch.equal(proj, init["decoder.transformer.wte.weight"]) != keep  # lm_head is tied to wte


def test_backbone_exit_aware_reports_exit_ce(data, tmp_path):
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "backbone", "--steps", 6,
                  "--warmup", 1, "--eval-every", 3, "--exit-aware", "--aux-weight", "0.5",
                  "--model-config", json.dumps(TINY)) == 0
    history = _meta(tmp_path / "ckpt")["training"]["backbone"]["history"]
    assert len(history) == 2
    for record in history:
        assert record["val_loss"] == pytest.approx(record["val_final_ce"] + 0.5 * record["val_exit_ce"], rel=1e-5)
    load_checkpoint(tmp_path / "ckpt")


# ----- stage encoder --------------------------------------------------------------------------------------------
def test_stage_encoder_trains_only_the_encoder_on_scene_objects_and_backbone_starts_from_it(data, tmp_path,
                                                                                          capsys):
    assert _train(data, tmp_path / "enc", tmp_path / "run-enc", "--stage", "encoder", "--steps", 30, "--lr", "3e-3",
                  "--warmup", 2, "--eval-every", 10, "--model-config", json.dumps(TINY)) == 0
    assert f"next: capeen train --stage backbone --init {tmp_path / 'enc'} ..." in capsys.readouterr().out
    history = _meta(tmp_path / "enc")["training"]["encoder"]["history"]
    assert [r["step"] for r in history] == [10, 20, 30]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 1.0
    for record in history:
        assert record["val_loss"] == pytest.approx(record["val_kinds_bce"] + record["val_count_ce"], rel=1e-5)
        assert 0.0 <= record["val_scene_acc"] <= 1.0

    # the same seed builds the same initial model: everything but the encoder is untouched
    torch.manual_seed(0)
    initial = CapeenModel(CapeenConfig(vocab_size=len(build_tokenizer(data)), **TINY)).state_dict()
    pretrained = _weights(tmp_path / "enc")
    assert not any(key.startswith("probe") for key in pretrained)  # the probe is not part of the model
    changed = {key for key, value in pretrained.items() if not torch.equal(value, initial[key])}
    assert changed and all(key.startswith("encoder.") for key in changed)

    assert _train(data, tmp_path / "bb", tmp_path / "run-bb", "--stage", "backbone", "--init", tmp_path / "enc",
                  "--steps", 2, "--warmup", 1, "--eval-every", 2) == 0
    assert f"next: capeen train --stage exits --init {tmp_path / 'bb'} ..." in capsys.readouterr().out
    stages = _meta(tmp_path / "bb")["training"]
    assert list(stages) == ["encoder", "backbone"]

    # the exits of a decoder never trained would learn to copy noise: refused before any data is read
    capsys.readouterr()
    assert _train(data, tmp_path / "ex", tmp_path / "run-ex", "--stage", "exits", "--init", tmp_path / "enc",
                  "--steps", 2) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its decoder was never trained (it records only stage encoder)" in err
    assert f"train --stage backbone --init {tmp_path / 'enc'} first" in err
    assert not (tmp_path / "ex").exists() and not (tmp_path / "run-ex").exists()


def test_stage_encoder_needs_scene_objects(tmp_path, capsys):
    coco = Path(__file__).parent / "fixtures" / "karpathy_coco_tiny.json"
    rc = _train(coco, tmp_path / "enc", tmp_path / "run", "--stage", "encoder", "--steps", 2,
                "--model-config", json.dumps(TINY))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "needs the scene objects" in err and "COCO_train2014_000000000073.png" in err


# ----- resume ---------------------------------------------------------------------------------------------------
def _interrupt_after_first_save(monkeypatch):
    original = Trainer._save_state

    def save_then_stop(self, directory):
        original(self, directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_state", save_then_stop)


def _refuse_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resuming must not unpickle")

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)


@pytest.mark.parametrize("stage, how", [("backbone", "interrupted"), ("backbone", "extended"),
                                        ("encoder", "interrupted"), ("backbone", "ctrl-c between evaluations")])
def test_resumed_run_equals_uninterrupted_run(data, tmp_path, monkeypatch, capsys, ctrl_c_raises, stage, how):
    n = 8
    common = ["--stage", stage, "--lr", "3e-3", "--eval-every", n // 2, "--model-config", json.dumps(TINY)]
    # "extended": first run with --steps n/2, then --resume --steps n. The LR schedule depends on --steps after
    # warm-up, so the warm-up covers the whole run to make both schedules identical.
    common += ["--warmup", 100] if how == "extended" else ["--warmup", 3]
    assert _train(data, tmp_path / "full", tmp_path / "run-full", "--steps", n, *common) == 0

    stopped_at = n // 2
    if how == "interrupted":  # Ctrl-C right after the state of step n/2 was written
        with monkeypatch.context() as m:
            _interrupt_after_first_save(m)
            assert _train(data, tmp_path / "half", tmp_path / "run-half", "--steps", n, *common) == 130
        assert "interrupted" in capsys.readouterr().err
        assert not (tmp_path / "half").exists()
    elif how == "extended":
        assert _train(data, tmp_path / "half", tmp_path / "run-half", "--steps", n // 2, *common) == 0
    else:  # a real SIGINT in the middle of step 3, long before the first evaluation would save anything
        stopped_at = 3
        losses = Trainer.batch_losses

        def interrupted_during_step_3(self, *args, **kwargs):
            if self.step == stopped_at - 1:
                os.kill(os.getpid(), signal.SIGINT)
            return losses(self, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(Trainer, "batch_losses", interrupted_during_step_3)
            assert _train(data, tmp_path / "half", tmp_path / "run-half", "--steps", n, *common) == 130
        err = capsys.readouterr().err
        assert f"stopped at step 3; the run state in {tmp_path / 'run-half'} holds step 3" in err
        assert "plus --resume" in err and not (tmp_path / "half").exists()
    assert json.loads((tmp_path / "run-half" / "last" / "train_state.json").read_text())["step"] == stopped_at

    with monkeypatch.context() as m:
        _refuse_unpickling(m)
        # the same command plus --resume (and, for "extended", more steps): the same --out
        assert _train(data, tmp_path / "half", tmp_path / "run-half", "--steps", n, "--resume", *common) == 0

    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.allclose(full[key], resumed[key], rtol=0, atol=1e-6), key
    strip = lambda history: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in history]  # noqa: E731
    h_full = _meta(tmp_path / "full")["training"][stage]["history"]
    h_resumed = _meta(tmp_path / "half")["training"][stage]["history"]
    assert len(h_resumed) == len(h_full) == 2
    for a, b in zip(strip(h_full), strip(h_resumed)):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    load_checkpoint(tmp_path / "half")


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
def test_termination_keeps_the_steps_taken_as_ctrl_c_does(data, tmp_path, monkeypatch, capsys, number):
    """`timeout`, `docker stop` or a scheduler's end of time sends SIGTERM: the run state is saved, not lost."""
    losses = Trainer.batch_losses

    def terminated_during_step_3(self, *args, **kwargs):
        if self.step == 2:
            os.kill(os.getpid(), number)
        return losses(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "batch_losses", terminated_during_step_3)
    common = ["--stage", "backbone", "--steps", 8, "--eval-every", 4, "--model-config", json.dumps(TINY)]
    previous = signal.signal(number, signal.SIG_DFL)  # as a terminal starts it (a runner may start us with it ignored)
    try:
        assert _train(data, tmp_path / "out", tmp_path / "run", *common) == 128 + number
        assert signal.getsignal(number) == signal.SIG_DFL  # the command's handler does not outlive it
    finally:
        signal.signal(number, previous)
    err = capsys.readouterr().err
    assert f"stopped at step 3; the run state in {tmp_path / 'run'} holds step 3" in err
    assert err.rstrip().endswith("capeen train: terminated")
    assert json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())["step"] == 3


@pytest.mark.parametrize("during", ["validation", "export"])
def test_termination_during_validation_or_export_loses_nothing(data, tmp_path, monkeypatch, capsys, during):
    """A stop in the middle of a validation used to lose its record for good; one while the checkpoint is written
    ended without a word."""
    common = ["--stage", "backbone", "--steps", 4, "--eval-every", 2, "--model-config", json.dumps(TINY)]
    target, name = (Trainer, "validate") if during == "validation" else (train_module, "save_checkpoint")
    original = getattr(target, name)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with monkeypatch.context() as m:
            m.setattr(target, name, terminated)
            assert _train(data, tmp_path / "out", tmp_path / "run", *common) == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    state = json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())
    if during == "validation":  # the first validation finished and was saved before the signal was taken
        assert [record["step"] for record in state["history"]] == [2] and "holds step 2" in err
    else:
        assert [record["step"] for record in state["history"]] == [2, 4]
        assert f"stopped while writing {tmp_path / 'out'}; the run state in {tmp_path / 'run'} holds step 4" in err
        assert not (tmp_path / "out").exists()
    assert _train(data, tmp_path / "out", tmp_path / "run", *common, "--resume") == 0
    assert [record["step"] for record in _meta(tmp_path / "out")["training"]["backbone"]["history"]] == [2, 4]


def test_resume_with_nothing_to_resume_is_a_one_line_error(data, tmp_path, capsys):
    rc = _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "backbone", "--steps", 2, "--resume",
                "--model-config", json.dumps(TINY))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nothing to resume" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("saved_by", ["this version", "a version without stored options"])
def test_resume_refuses_state_of_another_model(data, backbone, tmp_path, capsys, saved_by):
    ckpt, run = backbone
    shutil.copytree(run, tmp_path / "run")
    info_path = tmp_path / "run" / "last" / "train_state.json"
    if saved_by != "this version":
        info = json.loads(info_path.read_text())
        info_path.write_text(json.dumps({k: v for k, v in info.items() if k not in ("out", "stage", "options")}))
    before = ckpt.joinpath("model.safetensors").read_bytes()
    other = dict(TINY, n_layer=3, exit_layers=[1, 2])
    rc = _train(data, ckpt, tmp_path / "run", "--stage", "backbone", "--steps", 44, "--resume",
                "--lr", "3e-3", "--warmup", 5, "--eval-every", 4, "--model-config", json.dumps(other))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    if saved_by == "this version":  # the option that differs is named, with both values
        assert f"--model-config {json.dumps(TINY, separators=(',', ':'))} -> " in err[0]
    else:
        assert "another model" in err[0] and "--model-config" in err[0]
    assert ckpt.joinpath("model.safetensors").read_bytes() == before



# ----- bad input: refused in one line before any data is read or any step is taken -------------------------------
def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("bad options must be refused before the data is loaded")

    monkeypatch.setattr(train_module, "load_split", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("option, value, message", [
    ("--steps", 0, "--steps must be at least 1, got 0"),
    ("--steps", -5, "--steps must be at least 1, got -5"),
    ("--batch-size", 0, "--batch-size must be at least 1, got 0"),
    ("--batch-size", -3, "--batch-size must be at least 1, got -3"),
    ("--captions-per-image", 0, "--captions-per-image must be at least 1, got 0"),
    ("--eval-every", 0, "--eval-every must be at least 1, got 0"),
    ("--warmup", -1, "--warmup must be at least 0, got -1"),
    ("--lr", -0.001, "--lr must be at least 0, got -0.001"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--alpha", 1.5, "--alpha must be between 0 and 1"),
    ("--aux-weight", -1, "--aux-weight must be at least 0"),
    ("--temperature", 0, "--temperature must be greater than 0"),
    ("--seed", -1, "--seed must be between 0 and"),
])
def test_bad_numbers_are_refused_before_training(data, tmp_path, monkeypatch, capsys, option, value, message):
    _no_training(monkeypatch)
    rc = _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "backbone", "--steps", 2, option, value)
    assert rc == 2 and message in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no run state


@pytest.mark.parametrize("case", ["out is a file", "out under a file", "out under /proc", "run-dir is a file",
                                  "out holds other files"])
def test_unusable_output_places_are_refused_before_training(data, tmp_path, monkeypatch, capsys, case):
    _no_training(monkeypatch)
    (tmp_path / "notes.txt").write_text("mine")
    project = tmp_path / "proj"
    project.mkdir()
    (project / "config.json").write_text('{"my": "settings"}')
    out, run_dir = tmp_path / "ckpt", tmp_path / "run"
    if case == "out is a file":
        out = tmp_path / "notes.txt"
    elif case == "out under a file":
        out = tmp_path / "notes.txt" / "ckpt"
    elif case == "out under /proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        out = Path("/proc/capeen-test-ckpt")
    elif case == "run-dir is a file":
        run_dir = tmp_path / "notes.txt"
    else:
        out = project
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert _train(data, out, run_dir, "--stage", "backbone", "--steps", 2) == 2
    line = _one_line_error(capsys)
    assert str(run_dir if case == "run-dir is a file" else out) in line
    if case == "out holds other files":
        assert "not a capeen checkpoint" in line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "proj"]


def test_retraining_into_an_existing_checkpoint_replaces_it(data, tmp_path):
    common = ["--stage", "backbone", "--eval-every", 1, "--model-config", json.dumps(TINY)]
    assert _train(data, tmp_path / "ckpt", tmp_path / "run-1", "--steps", 1, *common) == 0
    assert _train(data, tmp_path / "ckpt", tmp_path / "run-2", "--steps", 2, *common) == 0
    assert _meta(tmp_path / "ckpt")["training"]["backbone"]["steps"] == 2
    load_checkpoint(tmp_path / "ckpt")


def test_a_truncated_training_image_is_a_one_line_error_naming_it(tmp_path, capsys):
    generate_dataset(tmp_path / "data", 6, 2, 0, seed=0, image_size=32, workers=1)
    image = tmp_path / "data" / "images" / "train_000004.png"
    image.write_bytes(image.read_bytes()[:150])
    rc = _train(tmp_path / "data", tmp_path / "ckpt", tmp_path / "run", "--stage", "backbone", "--steps", 2,
                "--model-config", json.dumps(TINY))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("capeen")]  # not tqdm's
    assert rc == 2 and len(err) == 1 and str(image) in err[0] and "truncated" in err[0]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["encoder", "backbone"])
def test_scene_objects_without_their_fields_are_a_one_line_error(tmp_path, capsys, stage):
    json_path = generate_dataset(tmp_path / "data", 4, 2, 0, seed=0, image_size=32, workers=1)
    document = json.loads(json_path.read_text())
    document["images"][1]["objects"] = [{"foo": 1}]
    json_path.write_text(json.dumps(document))
    capsys.readouterr()
    rc = _train(tmp_path / "data", tmp_path / "ckpt", tmp_path / "run", "--stage", stage, "--steps", 2,
                "--model-config", json.dumps(TINY))
    line = _one_line_error(capsys)
    assert rc == 2 and line.endswith(f"{json_path}: images[1].objects[0]: missing \"shape\"")


# ----- damaged or foreign run state ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    assert _train(data, root / "ckpt", root / "run", "--stage", "backbone", "--steps", 2, "--eval-every", 1,
                  "--model-config", json.dumps(TINY)) == 0
    return root / "ckpt", root / "run"


def _damage(last: Path, how: str) -> Path:
    tensors, info_path = last / "state.safetensors", last / "train_state.json"
    if how == "state.safetensors missing":
        tensors.unlink()
        return tensors
    if how == "state.safetensors truncated":
        tensors.write_bytes(tensors.read_bytes()[:1000])
        return tensors
    if how == "state.safetensors of another step":
        info = json.loads(info_path.read_text())
        info_path.write_text(json.dumps(dict(info, step=1)))  # a stop between the two files' renames
        return tensors
    if how == "train_state.json truncated":
        info_path.write_bytes(info_path.read_bytes()[:100])
        return info_path
    info = json.loads(info_path.read_text())
    del info["step"]
    info_path.write_text(json.dumps(info))
    return info_path


@pytest.mark.parametrize("how", ["state.safetensors missing", "state.safetensors truncated",
                                 "state.safetensors of another step", "train_state.json truncated",
                                 "train_state.json without step"])
def test_resuming_damaged_run_state_is_a_one_line_error_naming_the_file(data, short_run, tmp_path, capsys, how):
    ckpt, run = short_run
    shutil.copytree(run, tmp_path / "run")
    damaged = _damage(tmp_path / "run" / "last", how)
    before = ckpt.joinpath("model.safetensors").read_bytes()
    rc = _train(data, ckpt, tmp_path / "run", "--stage", "backbone", "--steps", 4, "--eval-every", 1, "--resume",
                "--model-config", json.dumps(TINY))
    line = _one_line_error(capsys)
    assert rc == 2 and f"{damaged}: " in line and "damaged" in line, line
    assert ckpt.joinpath("model.safetensors").read_bytes() == before


def test_resume_refuses_the_state_of_a_run_that_writes_another_out(data, tmp_path, monkeypatch, capsys):
    # both runs' --out are named "proj", so both default to the run directory runs/proj/backbone
    monkeypatch.chdir(tmp_path)
    common = ["train", "--data", str(data), "--device", "cpu", "--stage", "backbone", "--batch-size", 8,
              "--captions-per-image", 2, "--eval-every", 1, "--model-config", json.dumps(TINY)]
    assert main([*map(str, common), "--out", "a/proj", "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*map(str, common), "--out", "b/proj", "--steps", "4", "--resume"]) == 2
    line = _one_line_error(capsys)
    assert str(tmp_path / "a" / "proj") in line and "--run-dir" in line
    assert not (tmp_path / "b").exists()
    assert json.loads((tmp_path / "runs/proj/backbone/last/train_state.json").read_text())["step"] == 2
    # the run it belongs to still resumes
    assert main([*map(str, common), "--out", "a/proj", "--steps", "3", "--resume"]) == 0
    assert _meta(tmp_path / "a" / "proj")["training"]["backbone"]["history"][-1]["step"] == 3


def test_run_state_saved_before_the_out_was_recorded_still_resumes(data, short_run, tmp_path):
    ckpt, run = short_run
    shutil.copytree(run, tmp_path / "run")
    info_path = tmp_path / "run" / "last" / "train_state.json"
    info = json.loads(info_path.read_text())
    assert info["out"] == str(ckpt.resolve()) and info["stage"] == "backbone"
    assert info["options"]["model_overrides"] == TINY
    info_path.write_text(json.dumps({k: v for k, v in info.items() if k not in ("out", "stage", "options")}))
    assert _train(data, tmp_path / "elsewhere", tmp_path / "run", "--stage", "backbone", "--steps", 3,
                  "--eval-every", 1, "--resume", "--model-config", json.dumps(TINY)) == 0
    assert [r["step"] for r in _meta(tmp_path / "elsewhere")["training"]["backbone"]["history"]] == [1, 2, 3]


# ----- run directories shared by two runs -------------------------------------------------------------------------
@pytest.mark.parametrize("other", ["another out", "another stage"])
def test_a_new_run_refuses_to_overwrite_another_runs_state(data, tmp_path, monkeypatch, capsys, other):
    # "another out": both --out are named "proj", so both default to the run directory runs/proj/backbone
    monkeypatch.chdir(tmp_path)
    common = ["train", "--data", str(data), "--device", "cpu", "--batch-size", 8, "--captions-per-image", 2,
              "--eval-every", 1, "--model-config", json.dumps(TINY)]
    assert main([*map(str, common), "--stage", "backbone", "--out", "a/proj", "--steps", "2"]) == 0
    state = tmp_path / "runs/proj/backbone/last"
    saved = {p.name: p.read_bytes() for p in state.iterdir()}
    capsys.readouterr()
    if other == "another out":
        second = ["--stage", "backbone", "--out", "b/proj"]
    else:
        second = ["--stage", "encoder", "--out", "a/proj-encoder", "--run-dir", "runs/proj/backbone"]
    assert main([*map(str, common), *second, "--steps", "1"]) == 2
    line = _one_line_error(capsys)
    assert str(tmp_path / "a" / "proj") in line and "--run-dir" in line and "step 2" in line
    assert {p.name: p.read_bytes() for p in state.iterdir()} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "runs"]
    # that run still resumes, and a new start of it may replace its own state
    assert main([*map(str, common), "--stage", "backbone", "--out", "a/proj", "--steps", "3", "--resume"]) == 0
    assert main([*map(str, common), "--stage", "backbone", "--out", "a/proj", "--steps", "1"]) == 0
    assert json.loads((state / "train_state.json").read_text())["step"] == 1


# ----- a diverging run ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eval_every, what, step", [(1, "validation loss", 1), (100, "training loss", 2)])
def test_a_diverged_run_stops_and_leaves_out_as_it_was(data, backbone, tmp_path, capsys, eval_every, what, step):
    good = shutil.copytree(backbone[0], tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    capsys.readouterr()
    rc = _train(data, good, tmp_path / "run", "--stage", "backbone", "--steps", 6, "--warmup", 0, "--lr", "1e30",
                "--eval-every", eval_every, "--model-config", json.dumps(TINY))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("capeen")]  # not tqdm's
    assert rc == 2 and len(err) == 1, err
    assert f"the {what} is nan at step {step}" in err[0] and "lower --lr, without --resume" in err[0]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    state = tmp_path / "run" / "last" / "state.safetensors"
    if state.exists():  # whatever was saved can be resumed from: no NaN in it
        assert all(torch.isfinite(t).all() for t in load_file(str(state)).values() if t.is_floating_point())
        assert f"holds step {json.loads(state.with_name('train_state.json').read_text())['step']}" in err[0]
    else:
        assert "nothing was saved" in err[0]
    # the new start the advice asks for: the same command, a lower --lr, no --resume
    assert _train(data, good, tmp_path / "run", "--stage", "backbone", "--steps", 2, "--warmup", 0, "--lr", "1e-3",
                  "--eval-every", eval_every, "--model-config", json.dumps(TINY)) == 0


def test_a_resumed_run_that_diverges_names_the_step_its_state_holds(data, tmp_path, monkeypatch, capsys,
                                                                    ctrl_c_raises):
    # the state of a Ctrl-C save has no evaluation record: the advice must still name the step it holds
    common = ["--stage", "backbone", "--steps", 6, "--warmup", 50, "--lr", "1e30", "--eval-every", 100,
              "--model-config", json.dumps(TINY)]
    losses = Trainer.batch_losses

    def interrupted_during_step_1(self, *args, **kwargs):
        if self.step == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return losses(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "batch_losses", interrupted_during_step_1)
        assert _train(data, tmp_path / "ckpt", tmp_path / "run", *common) == 130
    assert json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())["step"] == 1
    capsys.readouterr()
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--resume", *common) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("capeen")]
    assert "is nan at step 2" in line and f"the run state in {tmp_path / 'run'} holds step 1" in line


# ----- resume continues the same run ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, shown", [
    (["--lr", "0.5"], "--lr 0.001 -> 0.5"),
    (["--batch-size", 4], "--batch-size 8 -> 4"),
    (["--captions-per-image", 1], "--captions-per-image 2 -> 1"),
    (["--seed", 9], "--seed 0 -> 9"),
    (["--warmup", 7], "--warmup 100 -> 7"),
    (["--exit-aware"], "--exit-aware off -> on"),
    (["--exit-aware", "--aux-weight", 0.5], "--aux-weight 1.0 -> 0.5"),
])
def test_resume_refuses_changed_options_naming_them(data, short_run, tmp_path, capsys, change, shown):
    ckpt, run = short_run
    shutil.copytree(run, tmp_path / "run")
    state = {p.name: p.read_bytes() for p in (tmp_path / "run" / "last").iterdir()}
    before = ckpt.joinpath("model.safetensors").read_bytes()
    base = ["--batch-size", 8, "--captions-per-image", 2, "--seed", 0]  # _train's, overridden by `change`
    rc = main(["train", "--data", str(data), "--out", str(ckpt), "--run-dir", str(tmp_path / "run"),
               "--device", "cpu", "--stage", "backbone", "--steps", "4", "--eval-every", "1", "--resume",
               "--model-config", json.dumps(TINY), *map(str, base), *map(str, change)])
    line = _one_line_error(capsys)
    assert rc == 2 and shown in line, line
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "last").iterdir()} == state
    assert ckpt.joinpath("model.safetensors").read_bytes() == before


def test_resume_refuses_fewer_steps_than_the_state_has(data, short_run, tmp_path, capsys):
    ckpt, run = short_run
    shutil.copytree(run, tmp_path / "run")
    rc = _train(data, ckpt, tmp_path / "run", "--stage", "backbone", "--steps", 1, "--eval-every", 1, "--resume",
                "--model-config", json.dumps(TINY))
    line = _one_line_error(capsys)
    assert rc == 2 and "--steps 1 is below the step this run state is at (2)" in line


def test_resume_keeps_the_training_record_of_the_init_checkpoint(data, backbone, tmp_path, monkeypatch):
    # a state saved before the options were stored: it resumes without its --init (nothing to compare), and the
    # export still holds the history of the checkpoint the run started from, which the state carries
    with monkeypatch.context() as m:
        _interrupt_after_first_save(m)
        assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "backbone", "--init", backbone[0],
                      "--steps", 2, "--eval-every", 1) == 130
    info_path = tmp_path / "run" / "last" / "train_state.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({k: v for k, v in info.items() if k != "options"}))
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "backbone", "--steps", 2, "--eval-every", 1,
                  "--resume", "--model-config", json.dumps(TINY)) == 0
    stages = _meta(tmp_path / "ckpt")["training"]
    assert list(stages) == ["backbone", "backbone-2"]
    assert stages["backbone"] == _meta(backbone[0])["training"]["backbone"]
    assert [r["step"] for r in stages["backbone-2"]["history"]] == [1, 2]


def test_a_ctrl_c_while_the_run_state_is_renamed_in_place_leaves_it_resumable(data, tmp_path, monkeypatch, capsys,
                                                                             ctrl_c_raises):
    original_replace = Path.replace
    saves = []

    def replace_then_interrupt(self, target):
        result = original_replace(self, target)
        if self.name == "state.safetensors.tmp":
            saves.append(self)
            if len(saves) == 2:  # between the two renames of the second save
                os.kill(os.getpid(), signal.SIGINT)
        return result

    common = ["--stage", "backbone", "--steps", 4, "--eval-every", 1, "--model-config", json.dumps(TINY)]
    with monkeypatch.context() as m:
        m.setattr(Path, "replace", replace_then_interrupt)
        assert _train(data, tmp_path / "ckpt", tmp_path / "run", *common) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(saves) == 2
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--resume", *common) == 0
    assert [r["step"] for r in _meta(tmp_path / "ckpt")["training"]["backbone"]["history"]] == [1, 2, 3, 4]


# ----- options and model configs that cannot mean what they say -------------------------------------------------------
@pytest.mark.parametrize("stage, extra, message", [
    ("backbone", ["--alpha", 0.3], "--alpha applies to stage exits only, not backbone"),
    ("backbone", ["--temperature", 4], "--temperature applies to stage exits only"),
    ("encoder", ["--ce-only"], "--ce-only applies to stage exits only, not encoder"),
    ("backbone", ["--keep-exits"], "--keep-exits applies to stage exits only"),
    ("exits", ["--exit-aware"], "--exit-aware applies to stage backbone only, not exits"),
    ("exits", ["--aux-weight", 2], "--aux-weight applies to stage backbone only"),
    ("backbone", ["--aux-weight", 2], "--aux-weight weighs the exit losses of --exit-aware"),
    ("backbone", ["--init", "INIT", "--model-config", '{"n_layer": 8}'], "--model-config cannot be used with --init"),
    ("backbone", ["--model-config", '{"bos_token_id": 3}'], "--model-config cannot set bos_token_id"),
    ("backbone", ["--model-config", '{"eos_token_id": 3, "pad_token_id": 1}'],
     "--model-config cannot set pad_token_id, eos_token_id"),
    ("backbone", ["--model-config", '{"vocab_size": 50}'], "--model-config cannot set vocab_size"),
])
def test_options_the_run_would_not_apply_are_refused_before_training(data, backbone, tmp_path, monkeypatch, capsys,
                                                                     stage, extra, message):
    _no_training(monkeypatch)
    init = [] if stage != "exits" else ["--init", backbone[0]]
    extra = [backbone[0] if value == "INIT" else value for value in extra]
    rc = _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", stage, "--steps", 2, *init, *extra)
    assert rc == 2 and message in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config, message", [
    ({"n_positions": 2}, "n_positions must be at least 3: BOS, one word, EOS"),
    ({"n_positions": 1}, "n_positions must be at least 3"),
    ({"exit_layers": [True, 2]}, "exit_layers must be whole layer numbers"),
    ({"exit_layers": [2.9]}, "exit_layers must be whole layer numbers"),
    ({"exit_layers": ["2"]}, "exit_layers must be whole layer numbers"),
])
def test_model_configs_that_make_no_useful_model_are_refused(data, tmp_path, capsys, config, message):
    rc = _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "backbone", "--steps", 2,
                "--model-config", json.dumps({**TINY, **config}))
    assert rc == 2 and message in _one_line_error(capsys)
    assert not (tmp_path / "ckpt").exists()


def test_training_exits_of_a_model_without_exit_heads_is_refused(data, tmp_path, capsys):
    no_exits = json.dumps({**TINY, "exit_layers": []})
    # a model without exits is a valid backbone...
    assert _train(data, tmp_path / "plain", tmp_path / "run-plain", "--stage", "backbone", "--steps", 1,
                  "--eval-every", 1, "--model-config", no_exits) == 0
    capsys.readouterr()
    # ...but it has nothing for stage exits or --exit-aware to train
    assert _train(data, tmp_path / "exits", tmp_path / "run-exits", "--stage", "exits", "--init",
                  tmp_path / "plain", "--steps", 1) == 2
    assert "stage exits trains the exit heads, but the --init checkpoint has none" in _one_line_error(capsys)
    assert _train(data, tmp_path / "aware", tmp_path / "run-aware", "--stage", "backbone", "--exit-aware",
                  "--steps", 1, "--model-config", no_exits) == 2
    assert "--exit-aware trains the exit heads too, but this model" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "run-plain"]


def test_a_batch_larger_than_the_train_split_still_has_batch_size_images(data, tmp_path, monkeypatch):
    seen: list[torch.Tensor] = []
    original = Trainer.batch_losses

    def recording(self, split, index, per_image, generator):
        if split is self.train:
            seen.append(index.clone())
        return original(self, split, index, per_image, generator)

    monkeypatch.setattr(Trainer, "batch_losses", recording)
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--stage", "backbone", "--steps", 2, "--batch-size", 30,
                  "--eval-every", 2, "--model-config", json.dumps(TINY)) == 0
    assert [len(index) for index in seen] == [30, 30]
    order = torch.cat(seen)
    for start in range(0, 48, 24):  # passes over the 24 training images, each image once per pass
        assert sorted(order[start:start + 24].tolist()) == list(range(24))


def test_an_extended_run_records_its_steps_and_its_clock_goes_on(data, tmp_path, monkeypatch):
    # a run of 2 steps extended to 4: its cosine schedule aimed at 2, then at 4, and the checkpoint says so;
    # the elapsed seconds of its history go on from where the first part stopped, not from 0
    import models.train

    ticks = iter(range(0, 10_000, 10))  # a clock that moves 10 s at each reading
    monkeypatch.setattr(models.train, "time", SimpleNamespace(time=lambda: float(next(ticks))))
    common = ["--stage", "backbone", "--eval-every", 2, "--model-config", json.dumps(TINY)]
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--steps", 2, *common) == 0
    first = _meta(tmp_path / "ckpt")["training"]["backbone"]
    assert "steps_given" not in first  # one start: nothing to say
    assert _train(data, tmp_path / "ckpt", tmp_path / "run", "--steps", 4, "--resume", *common) == 0
    extended = _meta(tmp_path / "ckpt")["training"]["backbone"]  # the same run, recorded again whole
    assert extended["steps_given"] == [2, 4] and extended["steps"] == 4
    before, after = (record["elapsed_s"] for record in extended["history"])
    # the same readings of the clock in both parts: only a clock counted on from the saved one gets further
    assert after > before == first["history"][0]["elapsed_s"]


# ----- a local Hugging Face encoder (--encoder-from) -------------------------------------------------------------
DECODER_ONLY = {key: value for key, value in TINY.items() if key in ("n_positions", "n_embd", "n_layer", "n_head",
                                                                     "n_inner", "exit_layers")}


def _hf_vit(directory: Path, **changes):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(1)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=96, num_labels=3, **changes)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(directory)  # safetensors, as transformers writes by default
    return model


def test_encoder_from_a_local_hugging_face_vit_starts_from_its_weights(data, tmp_path, capsys):
    from models.checkpoint import load_checkpoint

    hf = _hf_vit(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    # --lr 0: the checkpoint holds the starting weights, so they can be compared with the folder's
    assert _train(data, tmp_path / "out", tmp_path / "run", "--stage", "backbone", "--encoder-from", tmp_path / "vit",
                  "--steps", 1, "--lr", 0, "--warmup", 0, "--eval-every", 1,
                  "--model-config", json.dumps(DECODER_ONLY)) == 0
    err = capsys.readouterr().err
    assert "normalised with mean [0.485, 0.456, 0.406]" in err  # said, not silently fed other pixels

    model = load_checkpoint(tmp_path / "out").model
    config = model.config
    assert (config.encoder, config.image_size, config.patch_size, config.encoder_hidden, config.encoder_layers,
            config.encoder_heads, config.encoder_intermediate) == ("vit", 32, 8, 48, 1, 2, 96)
    assert model.enc_to_dec_proj is not None  # 48 wide into a 32-wide decoder
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = hf.vit(pixel_values=pixels).last_hidden_state
        ours = model.encoder(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert _meta(tmp_path / "out")["training"]["backbone"]["encoder_from"] == str(tmp_path / "vit")


def test_an_encoder_from_run_resumes_without_its_folder(data, tmp_path, monkeypatch, capsys):
    """The run state holds the encoder: a folder moved or deleted since does not stop the run."""
    _hf_vit(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": 0.5}))
    common = ["--stage", "backbone", "--encoder-from", tmp_path / "vit", "--steps", 4, "--eval-every", 2,
              "--model-config", json.dumps(DECODER_ONLY)]
    with monkeypatch.context() as m:
        _interrupt_after_first_save(m)
        assert _train(data, tmp_path / "out", tmp_path / "run", *common) == 130
    assert "normalised" not in capsys.readouterr().err  # one number for every channel, capeen's own 0.5
    shutil.rmtree(tmp_path / "vit")
    assert _train(data, tmp_path / "out", tmp_path / "run", *common, "--resume") == 0
    assert _meta(tmp_path / "out")["model"]["encoder_hidden"] == 48


def test_encoder_from_a_local_hugging_face_swin_builds_the_same_network():
    from transformers import SwinConfig, SwinModel

    from models.hf_import import encoder_overrides, load_encoder
    from models.model import CapeenConfig, CapeenModel

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(2)
        hf = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                  window_size=4, mlp_ratio=2.0)).eval()
        hf.save_pretrained(folder)
        fields = encoder_overrides(Path(folder))
        assert fields["encoder_hidden"] == 16 and fields["encoder_intermediate"] == 32
        model = CapeenModel(CapeenConfig.from_dict({**DECODER_ONLY, **fields, "vocab_size": 20})).eval()
        load_encoder(model, Path(folder))
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(pixel_values=pixels).last_hidden_state,
                                   hf(pixel_values=pixels).last_hidden_state, rtol=0, atol=1e-5)


def test_encoder_from_refuses_what_it_cannot_start_from_in_one_line(data, tmp_path, capsys):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30)).save_pretrained(tmp_path / "gpt2")
    _hf_vit(tmp_path / "no-bias", qkv_bias=False)
    _hf_vit(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "pytorch_model.bin")
    _hf_vit(tmp_path / "vit")
    shutil.copytree(tmp_path / "vit", tmp_path / "damaged")
    shutil.copytree(tmp_path / "vit", tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    (tmp_path / "edited" / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    (tmp_path / "damaged" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    cases = [
        (["--encoder-from", tmp_path / "damaged"], "transformers cannot load it"),
        (["--encoder-from", tmp_path / "gpt2"], "a gpt2 checkpoint; --encoder-from takes a ViT or a Swin"),
        (["--encoder-from", tmp_path / "no-bias"], "qkv_bias is False; capeen builds vit encoders with True only"),
        (["--encoder-from", tmp_path / "pickled"], "pytorch_model.bin is a pickle, which capeen does not load"),
        (["--encoder-from", tmp_path / "missing"], "not a folder"),
        (["--encoder-from", tmp_path / "edited", "--model-config", json.dumps(DECODER_ONLY)],
         "its weights do not match its config.json: "),  # the tensors' names vary with transformers' version
        (["--encoder-from", ""], "--encoder-from is empty (an unset shell variable?)"),
        (["--encoder-from", tmp_path / "vit", "--model-config", json.dumps({"encoder_hidden": 64})],
         "--model-config cannot set encoder_hidden: the --encoder-from encoder's config fixes it"),
        (["--encoder-from", tmp_path / "vit", "--init", tmp_path / "vit"], "give one of them"),
    ]
    assert_backbone_refused_in_one_line(data, tmp_path, capsys, cases)


def assert_backbone_refused_in_one_line(data, tmp_path, capsys, cases) -> None:
    """Each (extra options, words of the error) case: stage backbone exits 2 with one line, and writes nothing."""
    for extra, says in cases:
        capsys.readouterr()
        assert _train(data, tmp_path / "out", tmp_path / "run", "--stage", "backbone", "--steps", 1, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (says, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("preprocessor", "says"), [
    ({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, None),
    ({"image_mean": 0.5, "image_std": 0.5}, None),  # one number for every channel, as transformers reads it
    ({"do_resize": True}, None),  # nothing said about pixel statistics
    ({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, "mean [0.485, 0.456, 0.406]"),
    ({"image_mean": 0.5, "image_std": 0.25}, "std 0.25"),
    ({"do_normalize": False, "image_mean": 0.5, "image_std": 0.5}, "pixels in [0, 1], not normalised"),
])
def test_an_encoder_trained_on_other_pixel_statistics_is_named(tmp_path, preprocessor, says):
    from models.hf_import import _normalisation_note

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    note = _normalisation_note(tmp_path)
    assert note is None if says is None else (says in note and "capeen feeds it" in note)


def test_min_word_count_keeps_the_words_seen_that_often_and_reads_the_others_as_unk(data, backbone, tmp_path,
                                                                                     capsys):
    from collections import Counter

    from models.checkpoint import load_checkpoint
    from models.dataset import load_karpathy, records_for_split

    counts = Counter(word for record in records_for_split(load_karpathy(data / "dataset.json"), "train")
                     for caption in record.captions for word in caption)
    capsys.readouterr()
    assert _train(data, tmp_path / "out", tmp_path / "run", "--stage", "backbone", "--steps", 1, "--min-word-count", 3,
                  "--model-config", json.dumps(TINY)) == 0
    err = capsys.readouterr().err
    kept = {word for word, n in counts.items() if n >= 3}
    assert kept and len(kept) < len(counts)  # the test means something: some words are rarer than that
    assert set(load_checkpoint(tmp_path / "out").tokenizer.words[4:]) == kept
    rare = sum(n for n in counts.values() if n < 3)
    assert f"vocabulary of {len(kept)} words seen at least 3 times" in err
    assert f"capeen: {rare} of the {sum(counts.values())} words of the train captions" in err  # the loader's count

    assert _train(data, tmp_path / "none", tmp_path / "run-none", "--stage", "backbone", "--steps", 1,
                  "--min-word-count", 10**12, "--model-config", json.dumps(TINY)) == 2
    assert "no word of the training captions is seen 1000000000000 times" in capsys.readouterr().err

    assert _train(data, tmp_path / "out2", tmp_path / "run2", "--stage", "exits", "--init", backbone[0], "--steps", 1,
                  "--min-word-count", 3) == 2
    assert "--min-word-count cannot be used with --init" in capsys.readouterr().err


def test_an_option_newer_than_a_run_state_is_taken_at_its_default_on_resume(data, tmp_path, monkeypatch, capsys):
    """A run started before --min-word-count existed used 1: asking for 3 on resume is refused by name, at once."""
    common = ["--stage", "backbone", "--steps", 4, "--eval-every", 2, "--model-config", json.dumps(TINY)]
    with monkeypatch.context() as m:
        _interrupt_after_first_save(m)
        assert _train(data, tmp_path / "out", tmp_path / "run", *common) == 130
    state = tmp_path / "run" / "last" / "train_state.json"
    info = json.loads(state.read_text())
    del info["options"]["min_word_count"]  # as an older capeen wrote it
    state.write_text(json.dumps(info))
    capsys.readouterr()
    assert _train(data, tmp_path / "out", tmp_path / "run", *common, "--resume", "--min-word-count", 3) == 2
    assert "--min-word-count 1 -> 3" in capsys.readouterr().err
    assert _train(data, tmp_path / "out", tmp_path / "run", *common, "--resume") == 0
