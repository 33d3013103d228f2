"""Shared fixtures. Tests run on small random models, so they never depend on the shipped weights' quality."""

from __future__ import annotations

import os
import signal

import pytest
import torch

# Tests run next to each other on 2 cores: one intra-op thread avoids OpenMP barrier stalls between processes.
torch.set_num_threads(int(os.environ.get("CAPEEN_TEST_THREADS", "1")))

from models.checkpoint import Checkpoint, Thresholds, save_checkpoint  # noqa: E402
from models.model import CapeenConfig, CapeenModel  # noqa: E402
from models.scene import COLOURS, SHAPES, SIZES  # noqa: E402
from models.tokenizer import SPECIALS, WordTokenizer  # noqa: E402


def tiny_config(vocab_size: int, **overrides) -> CapeenConfig:
    base = dict(image_size=32, patch_size=8, encoder_hidden=32, encoder_layers=1, encoder_heads=2,
                encoder_intermediate=64, vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=4, n_head=2,
                n_inner=64, exit_layers=[1, 2, 3])
    base.update(overrides)
    return CapeenConfig(**base)


def make_tiny_checkpoint(directory, threshold: float | None = 0.6, seed: int = 0):
    """A random 4-layer model with a real word vocabulary, saved as a complete checkpoint directory."""
    torch.manual_seed(seed)
    words = ["a", "an", "and", "two", "three", "of", "the", "left", "right", *SIZES, *COLOURS, *SHAPES]
    tokenizer = WordTokenizer([*SPECIALS, *words])
    model = CapeenModel(tiny_config(len(tokenizer))).eval()
    with torch.no_grad():  # sharper heads so that exits really happen at mid thresholds
        for head in model.exits.values():
            head.proj.weight.mul_(5)
    ckpt = Checkpoint(model=model, tokenizer=tokenizer, thresholds=Thresholds(threshold=threshold),
                      meta={"name": "tiny-test"})
    return save_checkpoint(ckpt, directory)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture()
def ctrl_c_raises():
    """Ctrl-C as in a terminal, for tests that send the process a real SIGINT: a shell that starts a job in
    the background (CI's runner may) hands it SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
