"""Command-line options that several subcommands share (standard library only: `capeen --help` stays light)."""

from __future__ import annotations

import argparse
import os

# the variable `capeen serve` reads its checkpoint from (service.settings); the other commands default to it too
CHECKPOINT_VARIABLE = "CAPEEN_CHECKPOINT"

# models.decoding.KV_FILLS, spelled out here so that parsing arguments does not import torch
KV_FILLS = ("propagate", "deferred")


def add_kv_fill(parser: argparse.ArgumentParser, env_var: str | None = None) -> None:
    """`--kv-fill`: how the keys and values of layers a token skipped are filled (models.decoding)."""
    where = f"{env_var}, " if env_var else ""
    parser.add_argument("--kv-fill", choices=KV_FILLS,
                        help="how skipped layers' keys/values are filled: propagate (CALM, approximate, on the "
                             "spot) or deferred (exact, computed when a later token runs deeper); "
                             f"{where}default: the way the checkpoint was calibrated")


def add_half(parser: argparse.ArgumentParser) -> None:
    """`--half`: decode in bf16 (fp16 where the GPU lacks bf16) on CUDA; a CPU keeps fp32, which is faster there."""
    parser.add_argument("--half", action="store_true",
                        help="half precision on CUDA (bf16, else fp16); ignored on a CPU")


def add_image_dir(parser: argparse.ArgumentParser) -> None:
    """`--image-dir`: where a caption file's image paths start, when the images are not beside it."""
    parser.add_argument("--image-dir", metavar="DIR",
                        help="folder the caption file's image paths are relative to (default: the caption file's "
                             "folder); e.g. flickr30k-images/ for dataset_flickr30k.json, or the folder holding "
                             "train2014/ and val2014/ for dataset_coco.json")


def add_checkpoint(parser: argparse.ArgumentParser, writes: bool = False, environment: bool = True) -> None:
    """`--checkpoint`, by default CAPEEN_CHECKPOINT as for `capeen serve`, then the shipped model. A command that
    `writes` into the checkpoint has no silent default: rewriting the shipped model must be asked for by name.
    `environment=False` leaves the variable to the command (`capeen caption`, whose `--server` has no local model,
    tells a `--checkpoint` given from one read from the variable)."""
    default = os.environ.get(CHECKPOINT_VARIABLE) if environment else None
    if writes:
        parser.add_argument("--checkpoint", default=default,
                            help=f"checkpoint directory to write into ({CHECKPOINT_VARIABLE}; no default: the "
                                 "shipped one is models/checkpoints/default)")
    else:
        parser.add_argument("--checkpoint", default=default,
                            help=f"checkpoint directory ({CHECKPOINT_VARIABLE}; default: the shipped one, "
                                 "models/checkpoints/default)")
