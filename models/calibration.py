"""Threshold calibration: the fastest early-exit setting that keeps caption quality on held-out data.

On a calibration split (the data set's `val` split by default) every threshold of a grid, for each of a few
candidate sets of exits to consult, is decoded next to full depth, interleaved. Among the settings whose CIDEr-D
stays >= `quality_fraction` of full depth, the cheapest wins, cost being decoder layers computed plus heads
evaluated, each head weighted by its measured cost relative to a layer. Counts are exact and repeatable; wall
time on a shared machine is not, so the measured speedups are recorded but do not decide.

Why exit sets: every exit consulted costs a check (LayerNorm, projection, softmax) whether or not the token
leaves, and a shallow exit can be confidently wrong; consulting fewer exits trades exit granularity for both.
The chosen threshold and exit set, and the whole sweep, go to thresholds.json.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.bench import head_cost
from models.checkpoint import Thresholds
from models.engine import CaptionEngine
from models.evaluation import DEFAULT_SWEEP, EvalSet, evaluate_thresholds


def candidate_exit_sets(exit_layers: Sequence[int]) -> list[tuple[int, ...]]:
    """All trained exits; all but the shallowest; every second; every third (duplicates and empties dropped)."""
    layers = sorted(exit_layers)
    candidates = [tuple(layers), tuple(layers[1:]), tuple(layers[1::2]), tuple(layers[2::3])]
    unique: list[tuple[int, ...]] = []
    for c in candidates:
        if c and c not in unique:
            unique.append(c)
    return unique


def decode_cost(entry: dict, head_cost_ratio: float) -> float:
    """Per-token decoder cost in layer units: layers computed plus heads evaluated, weighted."""
    return entry["mean_exit_layer"] + head_cost_ratio * entry["heads_per_token"]


def choose_setting(sweep: list[dict], full: dict, quality_fraction: float, head_cost_ratio: float,
                   metric: str = "ciderD") -> dict | None:
    """The cheapest sweep entry whose metric is >= quality_fraction x full depth (None if there is none)."""
    floor = quality_fraction * full[metric]
    eligible = [entry for entry in sweep if entry[metric] >= floor]
    if not eligible:
        return None
    return min(eligible, key=lambda entry: (decode_cost(entry, head_cost_ratio), -entry[metric]))


def calibrate(engine: CaptionEngine, data: EvalSet, grid: Sequence[float] = DEFAULT_SWEEP,
              quality_fraction: float = 0.99, batch_size: int = 1, split: str = "val",
              exit_sets: Sequence[tuple[int, ...]] | None = None) -> Thresholds:
    sets = list(exit_sets) if exit_sets else candidate_exit_sets(engine.config.exit_layers)
    ratio = head_cost(engine)["ratio"]
    report = evaluate_thresholds(engine, data, grid, batch_size=batch_size, exit_sets=sets)
    full, sweep = report["full"], report["thresholds"]
    for entry in sweep:
        entry["cost_layers_per_token"] = decode_cost(entry, ratio)
    chosen = choose_setting(sweep, full, quality_fraction, ratio)
    details = {
        "criterion": f"fewest layers + {ratio:.3f} x heads per token with CIDEr-D >= {quality_fraction:g} x full depth",
        "head_cost_ratio": ratio,
        "quality_fraction": quality_fraction,
        "calibration_split": split,
        "images": len(data),
        "full_depth": full,
    }
    if chosen is not None:
        details["exit_layers"] = chosen["exit_layers"]
    return Thresholds(threshold=None if chosen is None else chosen["threshold"], sweep=sweep, details=details)
