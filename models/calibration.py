"""Threshold calibration: the fastest early-exit setting that keeps caption quality on held-out data.

On a calibration split (the data set's `val` split by default) every threshold of a grid, for each of a few
candidate sets of exits to consult, is decoded next to full depth, interleaved. Among the settings whose CIDEr-D
stays >= `quality_fraction` of full depth, the cheapest wins, cost being decoder layers computed plus heads
evaluated, each head weighted by its measured cost relative to a layer. Counts are exact and repeatable; wall
time on a shared machine is not, so the measured speedups are recorded but do not decide.

Why exit sets: every exit consulted costs a check (LayerNorm, projection, softmax) whether or not the token
leaves, and a shallow exit can be confidently wrong; consulting fewer exits trades exit granularity for both.
Per-exit schedules: a shallow exit is more often confidently wrong than a deep one, so one threshold for all
exits is rarely the cheapest way to keep quality. A full-depth decode of the calibration split with every exit
observed gives, per token, each exit's confidence and argmax; a coordinate search over per-exit thresholds
then trades cost against disagreement with the final layer's token, for a few weights of the latter. That
proxy only proposes: each proposal (written as a base threshold plus an offset per exit) is decoded for real,
interleaved with the grid, and judged on CIDEr-D like every other setting.

Keys and values of skipped layers are filled the engine's way (`kv_fill`, models.decoding); a threshold only
holds for that way, so it is recorded with the choice and becomes the engine's default. With deferred filling,
the layers computed later for positions catching up count too, at their measured cost per layer.

Margin for the sample: the calibration split is a sample, and the cheapest of some forty settings that pass
on it passes partly by luck (on three models, the chosen setting kept 0.4 to 1.3 points less of full depth's
CIDEr-D on the test split than on validation). So with a `confidence` a setting passes only if a lower
confidence bound of its share of full depth's CIDEr-D reaches the floor: a paired bootstrap over the images
(each image's CIDEr-D under the setting and at full depth resampled together), the same resamples for every
setting.

The chosen threshold, exit set and offsets, and the whole sweep, go to thresholds.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.bench import head_cost
from models.checkpoint import Thresholds
from models.decoding import FULL_DEPTH
from models.engine import CaptionEngine
from models.evaluation import DEFAULT_SWEEP, EvalSet, Setting, evaluate_thresholds
from models.preprocess import normalize

SCHEDULE_GRID = (0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
# weights of a token's disagreement with the final layer, in layers of cost: each gives one proposal
SCHEDULE_WEIGHTS = (40.0, 50.0, 60.0, 75.0, 100.0)


def candidate_exit_sets(exit_layers: Sequence[int]) -> list[tuple[int, ...]]:
    """All trained exits; all but the shallowest; every second; every third (duplicates and empties dropped)."""
    layers = sorted(exit_layers)
    candidates = [tuple(layers), tuple(layers[1:]), tuple(layers[1::2]), tuple(layers[2::3])]
    unique: list[tuple[int, ...]] = []
    for c in candidates:
        if c and c not in unique:
            unique.append(c)
    return unique


def decode_cost(entry: dict, head_cost_ratio: float, catch_up_ratio: float = 0.0) -> float:
    """Per-token decoder cost in layer units: layers computed up to the exit, heads evaluated, and (deferred
    keys and values) layers computed later for positions catching up, each weighted by its measured cost."""
    return (entry["mean_exit_layer"] + head_cost_ratio * entry["heads_per_token"]
            + catch_up_ratio * entry.get("catch_up_layers_per_token", 0.0))


def share_lower_bound(scores: Sequence[float], full_scores: Sequence[float], confidence: float,
                      resamples: int = 2000, seed: int = 0) -> float:
    """One-sided `confidence` lower bound of sum(scores) / sum(full_scores), per-image scores paired, by a
    percentile bootstrap over the images. The same seed and image count give the same resamples."""
    scores, full_scores = np.asarray(scores, dtype=float), np.asarray(full_scores, dtype=float)
    if scores.shape != full_scores.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError("per-image scores of the setting and of full depth must be paired and non-empty")
    picks = np.random.default_rng(seed).integers(0, len(scores), size=(resamples, len(scores)))
    kept, full = scores[picks].sum(axis=1), full_scores[picks].sum(axis=1)
    # a resample whose full-depth score is 0 keeps all of it when the setting also scores 0
    shares = np.divide(kept, full, out=np.where(kept >= full, 1.0, 0.0), where=full > 0)
    return float(np.quantile(shares, 1.0 - confidence))


def choose_setting(sweep: list[dict], full: dict, quality_fraction: float, head_cost_ratio: float,
                   metric: str = "ciderD", catch_up_ratio: float = 0.0, lower_bound: bool = False) -> dict | None:
    """The cheapest sweep entry whose metric is >= quality_fraction x full depth (None if there is none).

    With `lower_bound`, an entry's `<metric>_share_lower_bound` (see share_lower_bound) must reach
    quality_fraction instead of its point estimate."""
    if lower_bound:
        eligible = [entry for entry in sweep if entry[f"{metric}_share_lower_bound"] >= quality_fraction]
    else:
        eligible = [entry for entry in sweep if entry[metric] >= quality_fraction * full[metric]]
    if not eligible:
        return None
    return min(eligible, key=lambda entry: (decode_cost(entry, head_cost_ratio, catch_up_ratio), -entry[metric]))


@dataclass
class ExitObservations:
    """Per token of a full-depth decode: every trained exit's confidence and argmax, and the final token."""

    layers: tuple[int, ...]  # 1-based exit layers, the columns below
    confidence: np.ndarray  # (tokens, exits)
    prediction: np.ndarray  # (tokens, exits)
    final: np.ndarray  # (tokens,)


def observe_exits(engine: CaptionEngine, data: EvalSet, batch_size: int = 32) -> ExitObservations:
    layers = tuple(engine.config.exit_layers)
    confidence, prediction, final = [], [], []
    for start in range(0, len(data), batch_size):
        pixels = normalize(data.pixels[start:start + batch_size].to(engine.device), engine.dtype)
        out = engine.caption_pixels(pixels, FULL_DEPTH, observe_exits=True, exits=layers)
        for result in out.results:
            trace = result.trace
            for confs, preds, token in zip(trace.exit_confidences, trace.exit_predictions, trace.token_ids):
                confidence.append(confs[:-1])  # the last entry is the final layer's
                prediction.append(preds[:-1])
                final.append(token)
    return ExitObservations(layers, np.asarray(confidence).reshape(-1, len(layers)),
                            np.asarray(prediction).reshape(-1, len(layers)), np.asarray(final))


def schedule_outcome(obs: ExitObservations, thresholds: Sequence[float], n_layer: int,
                     head_cost_ratio: float) -> tuple[float, float]:
    """(cost in layers per token, share of tokens that differ from the final layer's) if each token left at
    the first exit whose confidence reaches its threshold (inf: exit not consulted) on the observed states."""
    tokens = len(obs.final)
    left_at = np.full(tokens, n_layer)
    token = obs.final.copy()
    heads = np.ones(tokens)  # the final head, for tokens that reach it
    running = np.ones(tokens, dtype=bool)
    for column, (layer, threshold) in enumerate(zip(obs.layers, thresholds)):
        if math.isinf(threshold):
            continue
        heads += running
        leaving = running & (obs.confidence[:, column] >= threshold)
        left_at[leaving], token[leaving] = layer, obs.prediction[leaving, column]
        running &= ~leaving
    heads -= ~running  # a token that left early never evaluated the final head
    cost = left_at.mean() + head_cost_ratio * heads.mean()
    return float(cost), float((token != obs.final).mean())


def search_schedule(obs: ExitObservations, n_layer: int, head_cost_ratio: float, weight: float,
                    grid: Sequence[float] = SCHEDULE_GRID, sweeps: int = 4) -> tuple[float, ...]:
    """Per-exit thresholds (inf: not consulted) minimising cost + weight x disagreement, by coordinate search
    from full depth; deterministic."""
    options = (*grid, math.inf)
    thresholds = [math.inf] * len(obs.layers)

    def objective(candidate: list[float]) -> float:
        cost, disagreement = schedule_outcome(obs, candidate, n_layer, head_cost_ratio)
        return cost + weight * disagreement

    for _ in range(sweeps):
        changed = False
        for column in range(len(thresholds)):
            best = min(options, key=lambda v: objective(thresholds[:column] + [v] + thresholds[column + 1:]))
            changed |= best != thresholds[column]
            thresholds[column] = best
        if not changed:
            break
    return tuple(thresholds)


def propose_schedules(obs: ExitObservations, n_layer: int, head_cost_ratio: float,
                      weights: Sequence[float] = SCHEDULE_WEIGHTS) -> list[Setting]:
    """One setting per weight: the consulted exits, a base threshold (the lowest) and an offset per exit."""
    settings: list[Setting] = []
    for weight in weights:
        thresholds = search_schedule(obs, n_layer, head_cost_ratio, weight)
        chosen = [(layer, t) for layer, t in zip(obs.layers, thresholds) if not math.isinf(t)]
        if not chosen:
            continue
        base = min(t for _, t in chosen)
        setting = Setting(base, tuple(layer for layer, _ in chosen), False,
                          tuple(round(t - base, 6) for _, t in chosen))
        if setting not in settings:
            settings.append(setting)
    return settings


def calibrate(engine: CaptionEngine, data: EvalSet, grid: Sequence[float] = DEFAULT_SWEEP,
              quality_fraction: float = 0.99, batch_size: int = 1, split: str = "val",
              exit_sets: Sequence[tuple[int, ...]] | None = None, schedules: bool = True,
              confidence: float = 0.95) -> Thresholds:
    """Sweep `grid` over the exit sets (plus, with `schedules`, the proposed per-exit schedules) and choose.

    `confidence` > 0: choose by the lower confidence bound of each setting's share of full depth's CIDEr-D
    (see share_lower_bound); 0: by the share measured on the calibration split."""
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    sets = list(exit_sets) if exit_sets else candidate_exit_sets(engine.config.exit_layers)
    costs = head_cost(engine)
    ratio = costs["ratio"]
    catch_up = costs["catch_up_ratio"] if engine.kv_fill == "deferred" else 0.0
    proposals = propose_schedules(observe_exits(engine, data), engine.config.n_layer, ratio) if schedules else []
    report = evaluate_thresholds(engine, data, grid, batch_size=batch_size, exit_sets=sets, schedules=proposals,
                                 per_image=True)
    full, sweep = report["full"], report["thresholds"]
    full_per_image = full.pop("ciderD_per_image")
    for entry in sweep:
        entry["cost_layers_per_token"] = decode_cost(entry, ratio, catch_up)
        per_image = entry.pop("ciderD_per_image")  # thresholds.json keeps the summaries only
        entry["ciderD_share"] = entry["ciderD"] / full["ciderD"] if full["ciderD"] > 0 else 1.0
        if confidence:
            entry["ciderD_share_lower_bound"] = share_lower_bound(per_image, full_per_image, confidence)
    chosen = choose_setting(sweep, full, quality_fraction, ratio, catch_up_ratio=catch_up,
                            lower_bound=bool(confidence))
    criterion = f"fewest layers + {ratio:.3f} x heads" + \
        (f" + {catch_up:.3f} x catch-up layers" if engine.kv_fill == "deferred" else "")
    floor = f"CIDEr-D >= {quality_fraction:g} x full depth"
    if confidence:
        floor += f" at {confidence:g} confidence (paired bootstrap lower bound over the images)"
    details = {
        "criterion": f"{criterion} per token with {floor}",
        "kv_fill": engine.kv_fill,
        "head_cost_ratio": ratio,
        "catch_up_cost_ratio": catch_up,
        "quality_fraction": quality_fraction,
        "confidence": confidence,
        "calibration_split": split,
        "images": len(data),
        "full_depth": full,
    }
    if chosen is not None:
        details["exit_layers"] = chosen["exit_layers"]
        if chosen.get("exit_offsets"):
            details["exit_offsets"] = chosen["exit_offsets"]
    return Thresholds(threshold=None if chosen is None else chosen["threshold"], sweep=sweep, details=details)
