"""Caption quality and measured decode speed, full depth against early exit, in one interleaved run.

Quality comes from pycocoevalcap (BLEU-1..4, ROUGE-L, CIDEr-D; METEOR when Java is present). Speed is
wall-clock time: for every batch, the full-depth decode and each early-exit setting run back to back in a
rotating order, so that a slow spell of the machine hits all of them alike.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from tqdm import tqdm

from models.decoding import FULL_DEPTH, DecodeTrace
from models.engine import BatchOutput, CaptionEngine
from models.preprocess import normalize
from models.scene import (attribute_accuracy, lone_object_shape_accuracy, scene_accuracy,
                          scene_accuracy_by_count)

DEFAULT_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


# ----- distortions ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distortion:
    """`none`, `noise:SIGMA` (Gaussian pixel noise, 0-255 scale) or `blur:RADIUS` (Gaussian blur, pixels)."""

    kind: str = "none"
    amount: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Distortion":
        if text in ("", "none", "clean"):
            return cls()
        kind, _, value = text.partition(":")
        if kind not in ("noise", "blur") or not value:
            raise ValueError(f"bad distortion {text!r}: use none, noise:SIGMA or blur:RADIUS")
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(f"bad distortion {text!r}: {value!r} is not a number") from None
        if not 0 <= amount <= 255:
            raise ValueError(f"bad distortion {text!r}: amount must be in [0, 255]")
        return cls(kind, amount)

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.amount:g}"

    def apply(self, pixels: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Distort uint8 (N, 3, H, W) images; deterministic for a given seed."""
        if self.kind == "none" or self.amount == 0:
            return pixels
        if self.kind == "noise":
            rng = np.random.default_rng(seed)
            noisy = pixels.numpy().astype(np.float32) + rng.normal(0, self.amount, pixels.shape).astype(np.float32)
            return torch.from_numpy(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
        blurred = [
            np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(self.amount)))
            for image in pixels
        ]
        return torch.from_numpy(np.stack(blurred).transpose(0, 3, 1, 2).copy())


# ----- metrics ----------------------------------------------------------------------------------------------
def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = False,
                    per_image: bool = False) -> dict:
    """Corpus metrics with pycocoevalcap. Captions are already lower-case words separated by spaces.

    With `per_image`, also each image's CIDEr-D ("ciderD_per_image"), whose mean is the corpus CIDEr-D."""
    res = {i: [h if h.strip() else "<empty>"] for i, h in enumerate(hypotheses)}
    gts = {i: [r for r in refs] for i, refs in enumerate(references)}
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"bleu{n}"] = float(value)
    scores["rougeL"] = float(Rouge().compute_score(gts, res)[0])
    cider, cider_per_image = Cider().compute_score(gts, res)
    scores["ciderD"] = float(cider)
    if per_image:
        scores["ciderD_per_image"] = [float(v) for v in cider_per_image]
    if meteor and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            scores["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.meteor_p.kill()
    return scores


# ----- interleaved decoding ---------------------------------------------------------------------------------
@dataclass
class EvalSet:
    pixels: torch.Tensor  # uint8 (N, 3, S, S)
    references: list[list[str]]  # raw reference captions per image
    objects: list[list[dict]] | None = None

    def __len__(self) -> int:
        return self.pixels.shape[0]


@dataclass
class DecodeRun:
    threshold: float
    exits: tuple[int, ...] | None = None  # exits consulted (None: the engine's default set)
    simulated: bool = False  # the paper's simulated exits: every layer computed (models.decoding)
    offsets: tuple[float, ...] | None = None  # added to the threshold at each exit (None: none, or the default's)
    captions: list[str] = field(default_factory=list)
    traces: list[DecodeTrace] = field(default_factory=list)
    encode_s: float = 0.0
    decode_s: float = 0.0
    kv_fill: str = ""


class Setting(NamedTuple):
    threshold: float
    exits: tuple[int, ...] | None = None  # exits consulted (None: the engine's default set and offsets)
    simulated: bool = False
    offsets: tuple[float, ...] | None = None  # per consulted exit, added to the threshold (None: none)


def decode_interleaved(engine: CaptionEngine, data: EvalSet, settings: Sequence[Setting], batch_size: int = 1,
                       distortion: Distortion = Distortion(), seed: int = 0, progress: bool = True) -> list[DecodeRun]:
    """Caption every image once per setting, alternating the settings batch by batch, after one untimed batch
    per setting (the first call of a setting pays for lazy set-up, which would count against whichever ran
    first, and on a few images would make up much of its time)."""
    runs = [DecodeRun(*setting) for setting in settings]
    order = list(range(len(runs)))
    batches = range(0, len(data), batch_size)
    label = "decoding" if str(distortion) == "none" else f"decoding ({distortion})"

    def caption(run: DecodeRun, pixels: torch.Tensor) -> BatchOutput:
        return engine.caption_pixels(pixels, run.threshold, exits=run.exits, simulate_exits=run.simulated,
                                     exit_offsets=run.offsets)

    for b, start in enumerate(tqdm(batches, desc=label, unit="batch", disable=not progress)):
        raw = distortion.apply(data.pixels[start:start + batch_size], seed=seed + start)
        pixels = normalize(raw.to(engine.device), engine.dtype)
        if b == 0:
            for run in runs:
                caption(run, pixels)
        rotation = order[b % len(order):] + order[: b % len(order)]
        for i in rotation:
            run = runs[i]
            out = caption(run, pixels)
            run.encode_s += out.timings.encode_s
            run.decode_s += out.timings.decode_s
            run.captions.extend(r.caption for r in out.results)
            run.traces.extend(r.trace for r in out.results)
            run.kv_fill = engine.kv_fill
    return runs


def summarize(run: DecodeRun, full: DecodeRun, data: EvalSet, n_layer: int, meteor: bool = False,
              per_image: bool = False) -> dict:
    """Quality, depth and measured speed of one setting, with speedups relative to the full-depth run."""
    steps = sum(len(t.exit_layers) for t in run.traces)
    exited = sum(sum(t.exit_layers) for t in run.traces)
    computed = sum(t.layers_computed() for t in run.traces)
    n = len(run.captions)
    summary = {
        "threshold": None if run.threshold > 1 else run.threshold,
        "exit_layers": None if run.threshold > 1 else list(run.exits or ()),
        "exit_offsets": None if run.threshold > 1 or not run.offsets else list(run.offsets),
        "simulated": run.simulated,
        "kv_fill": run.kv_fill,
        **caption_metrics(run.captions, data.references, meteor=meteor, per_image=per_image),
        "mean_exit_layer": exited / max(1, steps),
        # kv_fill="deferred": layers computed later for positions that had left early
        "catch_up_layers_per_token": (computed - exited) / max(1, steps),
        "layers_saved": 1.0 - computed / max(1, steps * n_layer),
        "decode_ms_per_caption": 1000 * run.decode_s / n,
        "total_ms_per_caption": 1000 * (run.decode_s + run.encode_s) / n,
        "decoder_speedup": full.decode_s / run.decode_s,
        "end_to_end_speedup": (full.decode_s + full.encode_s) / (run.decode_s + run.encode_s),
        "tokens_per_caption": steps / n,
        # heads evaluated per token, the final one included: the other cost of early exit besides layers
        "heads_per_token": sum(len(points) for t in run.traces for points in t.exit_points) / max(1, steps),
    }
    if data.objects is not None:
        summary["scene_accuracy"] = scene_accuracy(run.captions, data.objects)
        summary["scene_accuracy_by_count"] = scene_accuracy_by_count(run.captions, data.objects)
        summary["attribute_accuracy"] = attribute_accuracy(run.captions, data.objects)
        summary["lone_object_shape_accuracy"] = lone_object_shape_accuracy(run.captions, data.objects)
    return summary


def evaluate_thresholds(engine: CaptionEngine, data: EvalSet, thresholds: Sequence[float], batch_size: int = 1,
                        distortion: Distortion = Distortion(), meteor: bool = False, seed: int = 0,
                        progress: bool = True, exit_sets: Sequence[tuple[int, ...]] | None = None,
                        simulated: bool = False, schedules: Sequence[Setting] = (), per_image: bool = False) -> dict:
    """Full depth plus each (exit set, threshold), interleaved; {"full": summary, "thresholds": [summary, ...]}.

    `exit_sets` defaults to the engine's own exits (and offsets) only. With `simulated`, each setting is also
    decoded with the paper's simulated exits (every layer computed), and those summaries carry
    `"simulated": true`. `schedules` are further settings (per-exit offsets, say), decoded in the same rotation.
    With `per_image`, every summary also holds each image's CIDEr-D (see caption_metrics).
    """
    kinds = (False, True) if simulated else (False,)
    if exit_sets:
        plans = [(tuple(exits), None) for exits in exit_sets]
    else:
        plans = [(tuple(engine.exit_layers), tuple(engine.exit_offsets) if any(engine.exit_offsets) else None)]
    settings = [Setting(FULL_DEPTH)] + [Setting(t, exits, sim, offsets) for exits, offsets in plans
                                        for t in thresholds for sim in kinds] + list(schedules)
    runs = decode_interleaved(engine, data, settings, batch_size, distortion, seed, progress)
    full = runs[0]
    n_layer = engine.config.n_layer
    return {
        "distortion": str(distortion),
        "images": len(data),
        "batch_size": batch_size,
        "full": summarize(full, full, data, n_layer, meteor, per_image),
        "thresholds": [summarize(run, full, data, n_layer, meteor, per_image) for run in runs[1:]],
    }


def exit_agreement(engine: CaptionEngine, data: EvalSet, batch_size: int = 32) -> dict[int, float]:
    """Per exit: the share of tokens whose argmax equals the final layer's greedy token (full-depth decode)."""
    agree: dict[int, int] = {}
    total = 0
    for start in range(0, len(data), batch_size):
        pixels = normalize(data.pixels[start:start + batch_size].to(engine.device), engine.dtype)
        out = engine.caption_pixels(pixels, FULL_DEPTH, observe_exits=True, exits=engine.config.exit_layers)
        for result in out.results:
            for points, preds in zip(result.trace.exit_points, result.trace.exit_predictions):
                final = preds[-1]
                for layer, pred in zip(points[:-1], preds[:-1]):
                    agree[layer] = agree.get(layer, 0) + int(pred == final)
                total += 1
    return {layer: count / max(1, total) for layer, count in sorted(agree.items())}


def load_eval_set(dataset: str, split: str, image_size: int, limit: int | None = None,
                  image_root: str | None = None) -> EvalSet:
    """A split of a Karpathy-format data set as uint8 pixels plus references (and scene objects when known);
    `image_root` as in models.training_data.split_pixels."""
    from models.training_data import split_pixels

    records, pixels = split_pixels(dataset, split, image_size, limit, image_root)
    references = [[" ".join(words) for words in record.captions] for record in records]
    objects = [record.objects for record in records] if all(r.objects is not None for r in records) else None
    return EvalSet(pixels=pixels, references=references, objects=objects)

