"""Figures for the reports: quality against measured speedup over a threshold sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_sweeps(reports: list[dict], path: Path, metric: str = "ciderD") -> None:
    """One curve per (checkpoint, distortion): CIDEr-D against measured decoder speedup, full depth at 1x."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for report in reports:
        points = sorted([report["full"], *report["thresholds"]], key=lambda p: p["decoder_speedup"])
        xs = [p["decoder_speedup"] for p in points]
        ys = [p[metric] for p in points]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{report['checkpoint']} / {report['distortion']}")
    ax.set_xlabel("measured decoder speedup over full depth (x)")
    ax.set_ylabel("CIDEr-D" if metric == "ciderD" else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Early exit: caption quality against wall-clock speedup")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
