"""Threshold calibration: the fastest early-exit threshold that keeps caption quality on held-out data.

On a calibration split (the data set's `val` split by default) every threshold of a grid is decoded next to
full depth. "Fastest" means the fewest decoder layers computed per caption: that count is exact and
repeatable, where wall-clock time on a shared machine is not, and it is what the measured speedup follows.
The chosen threshold and the whole sweep (quality, mean exit layer, measured speedup) go to thresholds.json.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.checkpoint import Thresholds
from models.evaluation import DEFAULT_SWEEP, EvalSet, evaluate_thresholds
from models.engine import CaptionEngine


def choose_threshold(sweep: list[dict], full: dict, quality_fraction: float, metric: str = "ciderD") -> dict | None:
    """The sweep entry with the lowest mean exit layer whose metric is >= quality_fraction of full depth."""
    floor = quality_fraction * full[metric]
    eligible = [entry for entry in sweep if entry[metric] >= floor]
    if not eligible:
        return None
    return min(eligible, key=lambda entry: (entry["mean_exit_layer"], -entry[metric]))


def calibrate(engine: CaptionEngine, data: EvalSet, grid: Sequence[float] = DEFAULT_SWEEP,
              quality_fraction: float = 0.99, batch_size: int = 1, split: str = "val") -> Thresholds:
    report = evaluate_thresholds(engine, data, grid, batch_size=batch_size)
    full, sweep = report["full"], report["thresholds"]
    chosen = choose_threshold(sweep, full, quality_fraction)
    return Thresholds(
        threshold=None if chosen is None else chosen["threshold"],
        sweep=sweep,
        details={
            "criterion": f"fewest layers with CIDEr-D >= {quality_fraction:g} x full depth",
            "quality_fraction": quality_fraction,
            "calibration_split": split,
            "images": len(data),
            "full_depth": full,
        },
    )
