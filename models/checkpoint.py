"""Checkpoint directories: `config.json`, `model.safetensors`, `vocab.json`, `thresholds.json`.

Nothing here unpickles: weights are safetensors, everything else JSON. Every failure is a `CheckpointError`
whose message names the file and the problem in one line.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from capeen.errors import first_line
from capeen.outputs import new_file_mode
from models.decoding import KV_FILLS
from models.interrupts import signals_deferred
from models.model import CapeenConfig, CapeenModel
from models.tokenizer import WordTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
THRESHOLDS_FILE = "thresholds.json"

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "default"


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt or does not match its config."""


@dataclass
class Thresholds:
    """The calibrated early-exit threshold and the sweep it was chosen from (see `models.calibration`)."""

    threshold: float | None = None
    sweep: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "sweep": self.sweep, **self.details}

    @classmethod
    def from_dict(cls, data: dict) -> "Thresholds":
        threshold = data.get("threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 < threshold <= 1.0):
            raise ValueError(f'"threshold" must be a number in (0, 1], got {threshold!r}')
        sweep = data.get("sweep", [])
        if not isinstance(sweep, list) or not all(isinstance(entry, dict) for entry in sweep):
            raise ValueError('"sweep" must be a list of objects')
        exits = data.get("exit_layers")
        if exits is not None and (not isinstance(exits, list) or not exits
                                  or not all(isinstance(e, int) and not isinstance(e, bool) for e in exits)):
            raise ValueError(f'"exit_layers" must be a non-empty list of layer numbers, got {exits!r}')
        offsets = data.get("exit_offsets")
        if offsets is not None:
            numbers = isinstance(offsets, list) and all(
                isinstance(o, (int, float)) and not isinstance(o, bool) and math.isfinite(o) for o in offsets)
            if not numbers or exits is None or len(offsets) != len(exits):
                raise ValueError(f'"exit_offsets" must be a list of numbers, one per entry of "exit_layers", '
                                 f'got {offsets!r}')
            repeated = sorted({e for e in exits if exits.count(e) > 1})
            if repeated:  # which offset would hold?
                raise ValueError(f'"exit_layers" lists {repeated} more than once, each with an offset of its own')
        kv_fill = data.get("kv_fill", "propagate")
        if kv_fill not in KV_FILLS:
            raise ValueError(f'"kv_fill" must be one of {", ".join(KV_FILLS)}, got {kv_fill!r}')
        rest = {k: v for k, v in data.items() if k not in ("threshold", "sweep")}
        return cls(threshold=None if threshold is None else float(threshold), sweep=sweep, details=rest)


@dataclass
class Checkpoint:
    model: CapeenModel
    tokenizer: WordTokenizer
    thresholds: Thresholds
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.name if self.path else "capeen")


def _staging_path(path: Path) -> Path:
    """A fresh hidden name next to `path`, for writing it before it replaces `path`."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _commit(staged: dict[Path, Path]) -> None:
    """Rename each staged file over its target, with Ctrl-C and SIGTERM held back until all are in place."""
    mode = new_file_mode()
    for temporary in staged.values():
        os.chmod(temporary, mode)
    with signals_deferred():
        for target, temporary in staged.items():
            os.replace(temporary, target)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_checkpoint(ckpt: Checkpoint, directory: Path) -> Path:
    """Write the four files so that an interruption leaves the old checkpoint whole, never a mix: each is
    written under a temporary name (the slow part), then all are renamed into place at once."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged = {directory / name: _staging_path(directory / name)
              for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, THRESHOLDS_FILE)}
    try:
        _write_json(staged[directory / CONFIG_FILE], {"model": ckpt.model.config.to_dict(), **ckpt.meta})
        # lm_head shares wte's storage; safetensors refuses shared tensors, so the tied copy is not stored
        state = {k: v.detach().contiguous().cpu() for k, v in ckpt.model.state_dict().items()
                 if k != "decoder.lm_head.weight"}
        save_file(state, str(staged[directory / WEIGHTS_FILE]))
        ckpt.tokenizer.save(staged[directory / VOCAB_FILE])
        _write_json(staged[directory / THRESHOLDS_FILE], ckpt.thresholds.to_dict())
        _commit(staged)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
    return directory


def save_thresholds(directory: Path, thresholds: Thresholds) -> None:
    target = Path(directory) / THRESHOLDS_FILE
    staged = _staging_path(target)
    try:
        _write_json(staged, thresholds.to_dict())
        _commit({target: staged})
    finally:
        staged.unlink(missing_ok=True)


def _refuse_run_state(directory: Path) -> None:
    """A training run's state folder (its --run-dir, or the runs/<name> folder above its stages') given as a
    checkpoint: say where the checkpoint is, which the state records."""
    states = [directory / "train_state.json", directory / "last" / "train_state.json",
              *sorted(directory.glob("*/last/train_state.json"))]
    state = next((path for path in states if path.is_file()), None)
    if state is None:
        return
    try:
        out = json.loads(state.read_text()).get("out")
    except (OSError, ValueError, AttributeError):
        out = None
    where = f"its checkpoint is {out}" if isinstance(out, str) else "the checkpoint is the folder the run's --out named"
    raise CheckpointError(f"{directory}: the resumable state of a training run (--run-dir), not a checkpoint: {where}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:  # no permission, an I/O error
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def load_checkpoint(directory: Path | str | None = None, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory (default: the shipped one) onto `device`, in eval mode."""
    if directory is not None and not str(directory).strip():  # Path("") is the current folder
        raise CheckpointError("the checkpoint directory is an empty path (a variable left unset?)")
    directory = Path(directory) if directory is not None else DEFAULT_CHECKPOINT
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not (directory / CONFIG_FILE).exists():
        _refuse_run_state(directory)

    config_data = _read_json(directory / CONFIG_FILE)
    if not isinstance(config_data.get("model"), dict):
        hugging_face = "model_type" in config_data or "architectures" in config_data
        raise CheckpointError(f"{directory / CONFIG_FILE}: no \"model\" object, so not a capeen checkpoint"
                              + (" (a Hugging Face model's config: capeen loads checkpoints it wrote itself)"
                                 if hugging_face else ""))
    try:
        config = CapeenConfig.from_dict(config_data["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model config ({exc})") from None
    meta = {k: v for k, v in config_data.items() if k != "model"}

    try:
        tokenizer = WordTokenizer.load(directory / VOCAB_FILE)
    except FileNotFoundError:
        raise CheckpointError(f"{directory / VOCAB_FILE}: missing") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"{directory / VOCAB_FILE}: {exc}") from None
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(
            f"{directory / VOCAB_FILE}: {len(tokenizer)} words but config.json says vocab_size={config.vocab_size}"
        )

    thresholds_path = directory / THRESHOLDS_FILE
    try:
        thresholds = Thresholds.from_dict(_read_json(thresholds_path)) if thresholds_path.exists() else Thresholds()
    except ValueError as exc:
        raise CheckpointError(f"{thresholds_path}: {exc}") from None
    untrained = sorted(set(thresholds.details.get("exit_layers") or []) - set(config.exit_layers))
    if untrained:
        raise CheckpointError(f"{thresholds_path}: exit_layers {untrained} have no trained exit head "
                              f"(config.json has {config.exit_layers})")

    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from None

    try:
        model = CapeenModel(config)
    except (RuntimeError, MemoryError) as exc:  # a config of a model too large for this machine's memory
        raise CheckpointError(f"{directory / CONFIG_FILE}: cannot build the model it describes "
                              f"({first_line(exc)})") from None
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "decoder.lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{weights_path}: tensors do not match config.json ({detail})")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{weights_path}: {key} has shape {tuple(state[key].shape)}, config.json implies {tuple(shape)}"
            )
    broken = first_non_finite(state)
    if broken is not None:  # such a model captions every image with nothing, and a service would serve that
        raise CheckpointError(f"{weights_path}: {broken} holds values that are not finite (a training that "
                              f"diverged?)")
    model.load_state_dict(state, strict=False)  # strict=False only for the tied lm_head, checked above
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, thresholds=thresholds, path=directory, meta=meta)
