"""Two-stage CAPEEN training, with an optional encoder pre-training stage before it.

Stage `encoder` (optional, before stage 1): the paper starts from an ImageNet-pretrained Swin; nothing can be
downloaded here, so the image encoder is pre-trained on the synthetic scenes' ground truth instead. A linear
probe on the mean image token predicts which kinds of object (shape, colour, size) are present (binary
cross-entropy, summed over kinds) and how many objects there are (cross-entropy). Only the encoder and the
probe learn; the probe is dropped at export. It needs data sets with `objects` (ours have them).

Stage `backbone`: encoder + decoder with teacher-forced cross-entropy on the final layer. With `exit_aware`,
the exit heads are trained at the same time as auxiliary losses (as CALM and LayerSkip do), which pushes early
layers to become confident sooner.

Stage `exits` (the paper's stage 2): the backbone is frozen and only the exit heads learn, with
    loss = (1 - a) * CE(labels, exit) + a * T^2 * KL(final || exit)   (temperature T on both distributions)
or plain cross-entropy with `ce_only` (the ablation without distillation). Its heads start as copies of the
final head, or, with `keep_exits`, as the heads of the init checkpoint (distilling an exit-aware backbone's
heads towards its final layer).

Runs are resumable: `run_dir/last/` holds the weights, the optimizer state (both safetensors) and the step,
sampler and RNG state (JSON), so a stopped run continues exactly where it was. The state records the --out and
stage it was saved for: resuming it into another --out (two runs whose default run directories collide) is
refused, and so is a new run that would overwrite it. It also records the options that shape the weights: a
resume continues the run with them (only --steps may grow), and refuses any other value. Options, --out,
--run-dir and the state there are checked before any data is read or any step is taken.

A run whose loss or weights stop being finite (it diverged) ends with an error before it saves anything: the
state of its last finite evaluation and any checkpoint at --out are kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from capeen.errors import first_line
from models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    Thresholds,
    first_non_finite,
    load_checkpoint,
    save_checkpoint,
)
from models.dataset import load_karpathy, records_for_split
from models.gpt2_import import DECODER_FIELDS, decoder_overrides, load_decoder
from models.hf_import import ENCODER_FIELDS, encoder_overrides, load_encoder
from models.interrupts import signals_deferred, termination_interrupts
from models.model import CapeenConfig, CapeenModel
from models.preprocess import normalize
from models.scene import MAX_OBJECTS, SCENE_TRIPLES, scene_targets
from models.training_data import (
    SplitTensors,
    build_tokenizer,
    load_split,
    resolve_dataset_json,
)

STAGES = ("encoder", "backbone", "exits")


@dataclass
class TrainOptions:
    stage: str  # one of STAGES
    data: Path
    out: Path
    run_dir: Path
    init: Path | None = None  # checkpoint to start from (required for stage "exits")
    encoder_from: Path | None = None  # a local Hugging Face ViT or Swin to start the encoder from (models.hf_import)
    decoder_from: Path | None = None  # a local Hugging Face GPT-2 to start the decoder from (models.gpt2_import)
    min_word_count: int = 1  # a new model's vocabulary: the training captions' words seen this often
    steps: int = 2000
    batch_size: int = 32  # images per step
    captions_per_image: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    eval_every: int = 200
    val_images: int = 256
    seed: int = 0
    device: str = "auto"
    alpha: float = 0.5  # weight of the distillation term
    temperature: float = 2.0
    ce_only: bool = False
    keep_exits: bool = False  # stage exits: fine-tune the init checkpoint's heads instead of copying the final one
    exit_aware: bool = False
    aux_weight: float = 1.0  # weight of the mean exit loss when exit_aware
    resume: bool = False
    model_overrides: dict | None = None
    name: str = "capeen"
    image_dir: Path | None = None  # where the caption file's image paths start (default: the caption file's folder)


# special ids and vocabulary size come from the tokenizer that training builds; a config that names others would
# decode with ids the model was never trained on
TOKENIZER_FIXED = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")

# The options that shape a run's weights, per stage: resuming with another value of any of them would make a run
# that no single set of options describes. --steps may grow (that is how a run is extended); --eval-every,
# --val-images, --device, --name and where the data lies do not change the weights.
RUN_OPTIONS = {
    "encoder": ("init", "encoder_from", "decoder_from", "model_overrides", "min_word_count", "batch_size", "lr", "weight_decay",
                "warmup", "seed"),
    "backbone": ("init", "encoder_from", "decoder_from", "model_overrides", "min_word_count", "batch_size", "captions_per_image", "lr",
                 "weight_decay", "warmup",
                 "seed", "exit_aware", "aux_weight"),
    "exits": ("init", "batch_size", "captions_per_image", "lr", "weight_decay", "warmup", "seed", "alpha",
              "temperature", "ce_only", "keep_exits"),
}

_DAMAGED = "the run state is damaged: start the run again without --resume, or with a new --run-dir"


def _flag(name: str) -> str:
    """The command-line spelling of a TrainOptions field, for error messages."""
    if name == "model_overrides":
        return "--model-config"
    return "--" + name.replace("_", "-")


def _run_options(opts: TrainOptions) -> dict:
    """The options that shape the run's weights, as JSON values (the folders they name as absolute paths)."""
    values = {name: getattr(opts, name) for name in RUN_OPTIONS[opts.stage]}
    for name in ("init", "encoder_from", "decoder_from"):
        if name in values:
            values[name] = str(Path(values[name]).resolve()) if values[name] is not None else None
    if "model_overrides" in values:
        values["model_overrides"] = dict(opts.model_overrides or {})
    return values


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _number(opts: TrainOptions, name: str, integer: bool) -> int | float:
    value = getattr(opts, name)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{_flag(name)} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{_flag(name)} must be a finite number, got {value}")
    return value


def check_options(opts: TrainOptions) -> None:
    """Refuse options that cannot make a sensible run, before any data is read or any step is taken."""
    if opts.stage not in STAGES:
        raise ValueError(f"unknown stage {opts.stage!r} ({', '.join(STAGES)})")
    for name in ("steps", "batch_size", "captions_per_image", "eval_every", "val_images", "min_word_count"):
        value = _number(opts, name, integer=True)
        if value < 1:
            raise ValueError(f"{_flag(name)} must be at least 1, got {value}")
    warmup = _number(opts, "warmup", integer=True)
    if warmup < 0:
        raise ValueError(f"--warmup must be at least 0, got {warmup}")
    seed = _number(opts, "seed", integer=True)
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, got {seed}")
    for name in ("lr", "weight_decay", "aux_weight"):  # --lr 0: a run that exports its starting weights
        value = _number(opts, name, integer=False)
        if value < 0:
            raise ValueError(f"{_flag(name)} must be at least 0, got {value}")
    alpha = _number(opts, "alpha", integer=False)
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha must be between 0 and 1, got {alpha}")
    temperature = _number(opts, "temperature", integer=False)
    if temperature <= 0:
        raise ValueError(f"--temperature must be greater than 0, got {temperature}")
    if opts.init is not None and opts.model_overrides:
        raise ValueError("--model-config cannot be used with --init: the model's shape comes from the --init "
                         "checkpoint")
    if opts.init is not None and opts.min_word_count != 1:
        raise ValueError("--min-word-count cannot be used with --init: the vocabulary comes from the --init "
                         "checkpoint (give it to the run that builds the model, its first stage)")
    for name, part, fixed_fields in (("encoder_from", "encoder", ENCODER_FIELDS),
                                     ("decoder_from", "decoder", DECODER_FIELDS)):
        if getattr(opts, name) is None:
            continue
        if opts.init is not None:
            raise ValueError(f"{_flag(name)} starts a new model's {part}; --init continues a checkpoint, {part} "
                             f"included: give one of them")
        if opts.stage == "exits":
            raise ValueError(f"{_flag(name)} starts a new model; stage exits continues a trained backbone (--init)")
        given = [key for key in opts.model_overrides or {} if key in fixed_fields]
        if given:
            raise ValueError(f"--model-config cannot set {', '.join(given)}: the {_flag(name)} {part}'s config "
                             f"fixes {'it' if len(given) == 1 else 'them'}")
    fixed = [key for key in TOKENIZER_FIXED if key in (opts.model_overrides or {})]
    if fixed:
        raise ValueError(f"--model-config cannot set {', '.join(fixed)}: the tokenizer fixes "
                         f"{', '.join(TOKENIZER_FIXED)}")
    _check_stage_options(opts)


def _check_stage_options(opts: TrainOptions) -> None:
    """Refuse options the stage would ignore, so that the checkpoint never records settings its run did not use.

    An option is known to be given when it differs from its default (the command line's defaults are these).
    """
    defaults = {field.name: field.default for field in fields(TrainOptions)}
    only_for = {"alpha": "exits", "temperature": "exits", "ce_only": "exits", "keep_exits": "exits",
                "exit_aware": "backbone", "aux_weight": "backbone"}
    for name, stage in only_for.items():
        if opts.stage != stage and getattr(opts, name) != defaults[name]:
            raise ValueError(f"{_flag(name)} applies to stage {stage} only, not {opts.stage}")
    if opts.stage == "backbone" and not opts.exit_aware and opts.aux_weight != defaults["aux_weight"]:
        raise ValueError("--aux-weight weighs the exit losses of --exit-aware; without it there are none")


def _is_checkpoint(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def _check_writable_directory(path: Path, flag: str) -> None:
    """`path` is a directory this process can write in, or can be made one; whatever the check creates, it removes."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} exists and is not a directory")
    missing: list[Path] = []
    parent = path
    while not parent.exists() and not parent.is_symlink():
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    created: list[Path] = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            created.append(directory)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".capeen-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise ValueError(f"{flag} {path}: cannot write there: {exc.strerror or exc}{where}") from None
    finally:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()


def check_locations(opts: TrainOptions) -> None:
    """Refuse an --out or --run-dir that training could not write, before any step is taken.

    An existing --out must be empty or a capeen checkpoint (retraining into it replaces it); anything else in it
    would be overwritten or mixed with the new checkpoint's files.
    """
    out, run_dir = Path(opts.out), Path(opts.run_dir)
    _check_writable_directory(run_dir, "--run-dir")
    last = run_dir / "last"
    if last.exists() and not last.is_dir():
        raise ValueError(f"--run-dir {run_dir}: {last} exists and is not a directory")
    _check_writable_directory(out, "--out")
    if not out.is_dir() or _is_checkpoint(out):
        return
    run = run_dir.resolve()
    try:  # the run state may live inside --out: it is not a stranger's file
        foreign = [entry.name for entry in out.iterdir()
                   if entry.resolve() not in (run, run / "last", *run.parents)]
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ValueError(f"--out {out}: cannot list it: {first_line(exc)}") from None
    if foreign:
        raise ValueError(f"--out {out} is not empty and is not a capeen checkpoint (one has {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE}), so training would overwrite or mix with what it holds; give a new or "
                         f"empty directory, or a checkpoint to replace")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def caption_ce(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id)


def distillation_kl(exit_logits: torch.Tensor, final_logits: torch.Tensor, mask: torch.Tensor, t: float) -> torch.Tensor:
    """KL(final || exit) at temperature t, averaged over the real (non-pad) target positions."""
    log_p_exit = F.log_softmax(exit_logits.float() / t, dim=-1)
    log_p_final = F.log_softmax(final_logits.float() / t, dim=-1)
    kl = (log_p_final.exp() * (log_p_final - log_p_exit)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class SceneProbe(nn.Module):
    """Linear read-out of the mean image token: logits of each kind of object's presence and of the count."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, len(SCENE_TRIPLES) + MAX_OBJECTS)

    def forward(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(image_tokens.mean(dim=1)).float()
        return logits[:, : len(SCENE_TRIPLES)], logits[:, len(SCENE_TRIPLES):]


@dataclass
class SceneLabels:
    present: torch.Tensor  # (N, len(SCENE_TRIPLES)) 0/1
    count_index: torch.Tensor  # (N,) object count - 1


def scene_labels(records: list, name: str) -> SceneLabels:
    present, counts = [], []
    for record in records:
        if record.objects is None:
            raise ValueError(f"stage encoder needs the scene objects of every image; {name} image "
                             f"{record.image_path.name!r} has none (only synthetic data sets have them)")
        kinds, count = scene_targets(record.objects)
        if not 1 <= count <= MAX_OBJECTS:
            raise ValueError(f"{name} image {record.image_path.name!r} has {count} objects "
                             f"(1 to {MAX_OBJECTS} expected)")
        present.append(kinds)
        counts.append(count - 1)
    return SceneLabels(torch.tensor(present), torch.tensor(counts))


class Trainer:
    def __init__(self, opts: TrainOptions) -> None:
        check_options(opts)  # bad numbers and unwritable places fail now, not after the training
        if opts.stage == "exits" and opts.init is None:
            raise ValueError("stage exits needs --init, the checkpoint of a trained backbone")
        check_locations(opts)
        self.opts = opts
        state_path = Path(opts.run_dir) / "last" / "train_state.json"
        self.resume_info: dict | None = None
        if opts.resume:  # a state this run cannot continue is refused before any data is read
            self.resume_info = self._read_state_info(state_path)
            self._check_same_run(state_path, self.resume_info)
            self._check_same_options(state_path, self.resume_info)
        else:
            self._refuse_other_runs_state(state_path)
        self.device = pick_device(opts.device)
        torch.manual_seed(opts.seed)

        if opts.init is not None:
            ckpt = load_checkpoint(opts.init, device="cpu")
            self.model, self.tokenizer, self.meta = ckpt.model, ckpt.tokenizer, dict(ckpt.meta)
            trained = [stage.split("-")[0] for stage in self.meta.get("training", {})]
            if opts.stage == "exits" and trained and "backbone" not in trained:
                # its decoder is as initialised: exits trained to copy it would learn nothing, silently
                raise ValueError(f"stage exits freezes the backbone of --init {opts.init}, but its decoder was never "
                                 f"trained (it records only stage {', '.join(dict.fromkeys(trained))}): train "
                                 f"--stage backbone --init {opts.init} first")
        else:
            self.tokenizer = build_tokenizer(opts.data, opts.min_word_count)
            overrides = dict(opts.model_overrides or {})
            saved = (self.resume_info or {}).get("config")
            if isinstance(saved, dict):
                # a resumed run continues its own model: what its options leave open comes from its state (the
                # --encoder-from and --decoder-from folders' shapes, which need not be there any more; the defaults
                # of the version that started it), and its --model-config was checked to be the same
                base = saved
            else:
                base = encoder_overrides(opts.encoder_from) if opts.encoder_from is not None else {}
                if opts.decoder_from is not None:
                    base.update(decoder_overrides(opts.decoder_from))
            try:
                config = CapeenConfig.from_dict({**base, **overrides, "vocab_size": len(self.tokenizer)})
            except ValueError as exc:
                raise ValueError(f"--model-config: {exc}") from None
            self.model = CapeenModel(config)
            if opts.encoder_from is not None and self.resume_info is None:
                load_encoder(self.model, opts.encoder_from)
            if opts.decoder_from is not None and self.resume_info is None:
                load_decoder(self.model, opts.decoder_from, self.tokenizer.words)
            self.meta = {}
        self.config = self.model.config
        if not self.config.exit_layers:
            where = "the --init checkpoint" if opts.init is not None else "this model (--model-config)"
            if opts.stage == "exits":
                raise ValueError(f"stage exits trains the exit heads, but {where} has none (its exit_layers is "
                                 f"empty)")
            if opts.exit_aware:
                raise ValueError(f"--exit-aware trains the exit heads too, but {where} has none (its exit_layers "
                                 f"is empty)")
        if opts.stage == "exits":
            if not opts.keep_exits:
                self.model.init_exits_from_final_head()
            for p in self.model.backbone_parameters():
                p.requires_grad_(False)
        self.model.to(self.device)
        if opts.stage == "encoder":  # before decoding any image: a data set without objects fails at once
            dataset = load_karpathy(resolve_dataset_json(opts.data))
            for split in ("train", "val"):
                scene_labels(records_for_split(dataset, split), split)
        self.train = load_split(opts.data, "train", self.tokenizer, self.config.image_size, self.config.n_positions,
                                image_root=opts.image_dir)
        self.val = load_split(opts.data, "val", self.tokenizer, self.config.image_size, self.config.n_positions,
                              limit=opts.val_images, image_root=opts.image_dir)
        self.probe: SceneProbe | None = None
        if opts.stage == "encoder":
            self.train_labels = scene_labels(self.train.records, "train")
            self.val_labels = scene_labels(self.val.records, "val")
            self.probe = SceneProbe(self.config.encoder_hidden).to(self.device)
            self.trainable = [*self.model.encoder.parameters(), *self.probe.parameters()]
        else:
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=opts.lr, weight_decay=opts.weight_decay)
        self.generator = torch.Generator().manual_seed(opts.seed)
        self.step = 0
        self.saved_step = 0  # the step the run state in --run-dir holds (0: none saved by this run yet)
        self.elapsed_before = 0.0  # training seconds before this process: a resume's clock goes on
        self.steps_given = [opts.steps]  # --steps of each start of the run: an extended run's schedule changed
        self.epoch_order = torch.empty(0, dtype=torch.long)
        self.history: list[dict] = []
        if self.resume_info is not None:
            self._load_state(opts.run_dir / "last", self.resume_info)

    # ----- losses -------------------------------------------------------------------------------------------
    def losses(self, pixels: torch.Tensor, captions: torch.Tensor, per_image: int) -> dict[str, torch.Tensor]:
        inputs, targets = captions[:, :-1], captions[:, 1:]
        pad = self.tokenizer.pad_id
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            if self.opts.stage == "exits":
                with torch.no_grad():  # frozen backbone: its graph is not needed
                    cross = self.model.decoder.cross_kv(self.model.encode(pixels))
                    cross = [(k.repeat_interleave(per_image, 0), v.repeat_interleave(per_image, 0)) for k, v in cross]
                    states = self.model.decoder.hidden_states(inputs, cross)
                    final = self.model.decoder.final_logits(states[-1])
                exits = {layer: self.model.exits[str(layer)](states[layer - 1]) for layer in self.config.exit_layers}
            else:
                # the paper's stage 1 trains no exits: their heads are not computed at all
                final, exits = self.model(pixels, inputs, captions_per_image=per_image,
                                          with_exits=self.opts.exit_aware)

        out = {"final_ce": caption_ce(final, targets, pad)}
        exit_ce = torch.stack([caption_ce(logits, targets, pad) for logits in exits.values()]).mean() if exits else None
        if self.opts.stage == "backbone":
            out["loss"] = out["final_ce"]
            if self.opts.exit_aware and exit_ce is not None:
                out["exit_ce"] = exit_ce
                out["loss"] = out["loss"] + self.opts.aux_weight * exit_ce
        else:
            out["exit_ce"] = exit_ce
            if self.opts.ce_only:
                out["loss"] = exit_ce
            else:
                mask = (targets != pad).float()
                t = self.opts.temperature
                kl = torch.stack([distillation_kl(logits, final, mask, t) for logits in exits.values()]).mean()
                out["exit_kl"] = kl
                out["loss"] = (1 - self.opts.alpha) * exit_ce + self.opts.alpha * t * t * kl
        return out

    def scene_losses(self, pixels: torch.Tensor, labels: SceneLabels,
                     index: torch.Tensor) -> dict[str, torch.Tensor]:
        present = labels.present[index].to(self.device)
        count_index = labels.count_index[index].to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            kinds, counts = self.probe(self.model.encoder(pixel_values=pixels).last_hidden_state)
        # summed over kinds: with 1 to 4 of 96 kinds present a mean would drown the positives
        kinds_bce = F.binary_cross_entropy_with_logits(kinds, present, reduction="none").sum(dim=1).mean()
        count_ce = F.cross_entropy(counts, count_index)
        exact = ((kinds > 0) == present.bool()).all(dim=1) & (counts.argmax(dim=1) == count_index)
        return {"loss": kinds_bce + count_ce, "kinds_bce": kinds_bce, "count_ce": count_ce,
                "scene_acc": exact.float().mean()}

    def batch_losses(self, split: SplitTensors, index: torch.Tensor, per_image: int,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.opts.stage == "encoder":
            labels = self.train_labels if split is self.train else self.val_labels
            return self.scene_losses(normalize(split.pixels[index].to(self.device)), labels, index)
        pixels, captions = split.sample(index, per_image, generator)
        return self.losses(normalize(pixels.to(self.device)), captions.to(self.device), per_image)

    # ----- loop ---------------------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        # a batch larger than the train split takes more than one pass over it, so that every step sees --batch-size
        while len(self.epoch_order) < self.opts.batch_size:
            self.epoch_order = torch.cat([self.epoch_order, torch.randperm(len(self.train), generator=self.generator)])
        batch, self.epoch_order = self.epoch_order[: self.opts.batch_size], self.epoch_order[self.opts.batch_size:]
        return batch

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        totals: dict[str, float] = {}
        n = 0
        for start in range(0, len(self.val), 64):
            index = torch.arange(start, min(start + 64, len(self.val)))
            per = int(self.val.caption_counts.min())
            parts = self.batch_losses(self.val, index, per, torch.Generator().manual_seed(0))
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(index)
            n += len(index)
        self._train_mode()
        return {f"val_{k}": v / n for k, v in totals.items()}

    def _train_mode(self) -> None:
        self.model.train()
        if self.opts.stage == "exits":  # the frozen backbone runs as at inference: BatchNorm statistics stay put
            for module in (self.model.encoder, self.model.enc_to_dec_proj, self.model.decoder):
                if module is not None:
                    module.eval()

    def run(self) -> Path:
        opts = self.opts
        self._train_mode()
        self.started = time.time() - self.elapsed_before  # a resumed run's clock goes on from its state's
        bar = tqdm(total=opts.steps, initial=self.step, desc=f"train {opts.stage}", unit="step")
        with termination_interrupts():
            with contextlib.closing(bar):  # the bar's remains never follow an error
                try:
                    self._steps(bar)
                except KeyboardInterrupt:  # Ctrl-C, or Terminated
                    self._save_on_interrupt(bar)
                    raise
            try:
                return self.export()
            except KeyboardInterrupt:  # the checkpoint's own renames are whole (models.checkpoint): --out is as it was
                # the last step's validation saved the state, or the resumed state was already at the last step
                print(f"capeen train: stopped while writing {opts.out}; the run state in {opts.run_dir} holds step "
                      f"{self.step}, the last: the same command plus --resume writes it", file=sys.stderr)
                raise

    def _save_on_interrupt(self, bar) -> None:
        """Ctrl-C: keep the steps taken since the last save, and say how to go on."""
        if self.step > self.saved_step and first_non_finite(self.model.state_dict()) is None:
            self._save_state(self.opts.run_dir / "last")
        bar.close()  # before the message, so that the bar's last redraw does not follow it
        if self.saved_step:
            print(f"capeen train: stopped at step {self.step}; the run state in {self.opts.run_dir} holds step "
                  f"{self.saved_step}: continue it with the same command plus --resume", file=sys.stderr)

    def _steps(self, bar) -> None:
        opts = self.opts
        while self.step < opts.steps:
            with signals_deferred():  # a Ctrl-C waits for the end of the step, where the run's state is whole
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(self.step, opts)
                index = self.next_batch()
                parts = self.batch_losses(self.train, index, opts.captions_per_image, self.generator)
                loss = parts["loss"].item()
                self._refuse_divergence("training loss", loss, self.step + 1)
                self.optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
                self.optimizer.step()
                self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.step % opts.eval_every == 0 or self.step == opts.steps:
                # deferred too: a stop in the middle would lose the record, and resuming would not take it again
                with signals_deferred():
                    record = {"step": self.step, "loss": loss, **self.validate(),
                              "elapsed_s": self._elapsed()}
                    self._refuse_divergence("validation loss", record["val_loss"], self.step)
                    self._refuse_non_finite_weights()
                    self.history.append(record)
                    bar.write(json.dumps(record))
                    self._save_state(opts.run_dir / "last")

    def _elapsed(self) -> float:
        return round(time.time() - self.started, 1)

    def _divergence_advice(self) -> str:
        kept = (f"the run state in {self.opts.run_dir} holds step {self.saved_step}, the last one saved"
                if self.saved_step else "nothing was saved")
        # --resume keeps the run's own --lr: a lower one is a new start
        return f"the run diverged: start it again with a lower --lr, without --resume ({kept}; --out is left as " \
               f"it was)"

    def _refuse_divergence(self, what: str, value: float, step: int) -> None:
        """Stop before a non-finite loss can reach the run state or --out: its weights are lost already."""
        if not math.isfinite(value):
            raise ValueError(f"the {what} is {value} at step {step}: {self._divergence_advice()}")

    def _refuse_non_finite_weights(self) -> None:
        name = first_non_finite(self.model.state_dict())
        if name is not None:
            raise ValueError(f"weight {name} is not finite at step {self.step}: {self._divergence_advice()}")

    def export(self) -> Path:
        self._refuse_non_finite_weights()  # never over a checkpoint that may be good
        stages = dict(self.meta.get("training", {}))
        # a run that continues an earlier one of the same stage is recorded beside it, not over it
        key, n = self.opts.stage, 2
        while key in stages:
            key, n = f"{self.opts.stage}-{n}", n + 1
        stages[key] = {
            # paths absolute: the working directory they were relative to is not recorded
            **{k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in asdict(self.opts).items()
               if k not in ("resume", "run_dir", "out")},
            "history": self.history,
        }
        if len(self.steps_given) > 1:  # extended with --resume: the schedule ran towards each of these in turn
            stages[key]["steps_given"] = self.steps_given
        meta = {**self.meta, "name": self.opts.name, "training": stages}
        # a calibrated threshold belongs to the exits it was measured on: new weights start uncalibrated
        ckpt = Checkpoint(model=self.model.cpu(), tokenizer=self.tokenizer, thresholds=Thresholds(), meta=meta)
        path = save_checkpoint(ckpt, self.opts.out)
        self.model.to(self.device)
        return path

    # ----- resumable state (no pickle: tensors in safetensors, the rest in JSON) -----------------------------
    def _save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                   if k != "decoder.lm_head.weight"}
        if self.probe is not None:
            tensors.update({f"probe.{k}": v.detach().cpu().contiguous() for k, v in self.probe.state_dict().items()})
        opt_state = self.optimizer.state_dict()
        for pid, state in opt_state["state"].items():
            for key, value in state.items():
                tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.sampler"] = self.generator.get_state()
        tensors["sampler.order"] = self.epoch_order.contiguous()
        # the step in both files: a stop between the two renames below is caught on resume, not trained on
        save_file(tensors, str(directory / "state.safetensors.tmp"), metadata={"step": str(self.step)})
        info = {"step": self.step, "history": self.history, "param_groups": opt_state["param_groups"],
                "config": self.config.to_dict(), "vocab": self.tokenizer.words, "meta": self.meta,
                "out": str(Path(self.opts.out).resolve()), "stage": self.opts.stage,
                "elapsed_s": self._elapsed(), "steps_given": self.steps_given,
                "options": _run_options(self.opts)}
        (directory / "train_state.json.tmp").write_text(json.dumps(info))
        with signals_deferred():  # a Ctrl-C between the renames would leave files of two steps: unresumable
            (directory / "state.safetensors.tmp").replace(directory / "state.safetensors")
            (directory / "train_state.json.tmp").replace(directory / "train_state.json")
            self.saved_step = self.step

    def _read_state_info(self, path: Path) -> dict:
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: missing; nothing to resume") from None
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); {_DAMAGED}") from None
        if not isinstance(info, dict):
            raise ValueError(f"{path}: expected a JSON object; {_DAMAGED}")
        kinds = {"step": int, "history": list, "param_groups": list, "config": dict, "vocab": list}
        for key, kind in kinds.items():
            if key not in info:
                raise ValueError(f"{path}: missing \"{key}\"; {_DAMAGED}")
            if not isinstance(info[key], kind) or isinstance(info[key], bool):
                raise ValueError(f"{path}: \"{key}\" is not a {kind.__name__}; {_DAMAGED}")
        if info["step"] < 0:
            raise ValueError(f"{path}: \"step\" is negative; {_DAMAGED}")
        return info

    def _check_same_run(self, path: Path, info: dict) -> None:
        """The state in --run-dir must be this run's: same --out and stage (state before these were saved: any)."""
        out = str(Path(self.opts.out).resolve())
        saved_out, saved_stage = info.get("out"), info.get("stage")
        if saved_stage is not None and saved_stage != self.opts.stage:
            raise ValueError(f"{path}: this run state is of stage {saved_stage}, not {self.opts.stage}; "
                             f"give this run a --run-dir of its own")
        if saved_out is not None and saved_out != out:
            raise ValueError(f"{path}: this run state belongs to the run that writes --out {saved_out}, not "
                             f"{out}; resume with that --out, or give this run a --run-dir of its own")

    def _refuse_other_runs_state(self, path: Path) -> None:
        """A new run must not overwrite the resumable state of another run (two default run directories collide).

        A state that cannot be read is not resumable either, and one saved before the out and stage were recorded
        cannot be told apart: both may be replaced, like the state of this run's own earlier start.
        """
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(info, dict):
            return
        out = str(Path(self.opts.out).resolve())
        saved_out, saved_stage = info.get("out"), info.get("stage")
        if (saved_out is None or saved_out == out) and (saved_stage is None or saved_stage == self.opts.stage):
            return
        step = info.get("step")
        raise ValueError(f"--run-dir {self.opts.run_dir} holds the resumable state of another run (stage "
                         f"{saved_stage}, --out {saved_out}, step {step}); give this run a --run-dir of its own, "
                         f"or remove {path.parent} if that run is not wanted any more")

    def _check_same_options(self, path: Path, info: dict) -> None:
        """Resuming continues the run the state was saved for: the options that shape its weights stay as they were.

        A state saved before the options were recorded cannot be checked.
        """
        if self.opts.steps < info["step"]:
            raise ValueError(f"{path}: --steps {self.opts.steps} is below the step this run state is at "
                             f"({info['step']}); give at least {info['step']}")
        saved = info.get("options")
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise ValueError(f"{path}: \"options\" is not an object; {_DAMAGED}")
        current = _run_options(self.opts)
        # an option newer than the state was at its default then (a state saved before options were recorded
        # at all cannot be checked: see above)
        defaults = _run_options(TrainOptions(stage=self.opts.stage, data=self.opts.data, out=self.opts.out,
                                             run_dir=self.opts.run_dir))
        saved = {**{name: value for name, value in defaults.items() if name != "init"}, **saved}
        changed = [f"{_flag(name)} {_shown(saved[name])} -> {_shown(value)}" for name, value in current.items()
                   if name in saved and saved[name] != value]
        if changed:
            raise ValueError(f"{path}: --resume continues a run with its own options, but these differ: "
                             f"{', '.join(changed)}; give the run's values, or start a new run with a --run-dir "
                             f"of its own")

    def _load_state(self, directory: Path, info: dict) -> None:
        info_path, tensors_path = directory / "train_state.json", directory / "state.safetensors"
        if info["config"] != self.config.to_dict() or info["vocab"] != self.tokenizer.words:
            raise ValueError(f"{directory}: run state belongs to another model or vocabulary; resume with the "
                             f"run's --init or --model-config and --data, or use a new --run-dir")
        if not tensors_path.is_file():
            raise ValueError(f"{tensors_path}: missing; {_DAMAGED}")
        try:
            with safe_open(str(tensors_path), framework="pt") as handle:
                saved_step = (handle.metadata() or {}).get("step")
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{tensors_path}: cannot read ({first_line(exc)}); {_DAMAGED}") from None
        if saved_step is not None and saved_step != str(info["step"]):
            raise ValueError(f"{tensors_path}: holds step {saved_step} but {info_path.name} says step "
                             f"{info['step']} (the run stopped while saving); {_DAMAGED}")
        try:
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                                       strict=False)
            self.model.to(self.device)
            if self.probe is not None:
                self.probe.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("probe.")})
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, pid, name = key.split(".", 2)
                    state.setdefault(int(pid), {})[name] = value.to(self.device) if name != "step" else value
            self.optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
            torch.set_rng_state(tensors["rng.torch"])
            self.generator.set_state(tensors["rng.sampler"])
            self.epoch_order = tensors["sampler.order"]
        except KeyError as exc:
            raise ValueError(f"{tensors_path}: no tensor {exc}; {_DAMAGED}") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{tensors_path}: does not fit this run ({first_line(exc)}); {_DAMAGED}") from None
        self.step = self.saved_step = info["step"]
        self.history = info["history"]
        elapsed = info.get("elapsed_s", self.history[-1].get("elapsed_s", 0.0) if self.history else 0.0)
        self.elapsed_before = float(elapsed) if isinstance(elapsed, (int, float)) else 0.0
        given = info.get("steps_given")
        if isinstance(given, list) and all(isinstance(g, int) for g in given) and given:
            self.steps_given = given if given[-1] == self.opts.steps else [*given, self.opts.steps]
        # the training record the run started from (its --init's), even if that checkpoint has changed since
        if isinstance(info.get("meta"), dict):
            self.meta = info["meta"]


def train(opts: TrainOptions) -> Path:
    return Trainer(opts).run()
