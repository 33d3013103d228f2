"""Figures for the reports: quality against measured speedup over a threshold sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_sweeps(reports: list[dict], path: Path, metric: str = "ciderD") -> None:
    """One curve per (checkpoint, distortion): CIDEr-D against measured decoder speedup, full depth at 1x.

    Simulated exits (every layer computed) are drawn dashed against the speedup their layer count claims, the
    figure the paper reports: their measured speedup is about 1x.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for report in reports:
        full = report["full"]
        label = f"{report['checkpoint']} / {report['distortion']}"
        real = [p for p in report["thresholds"] if not p.get("simulated")]
        points = sorted([full, *real], key=lambda p: p["decoder_speedup"])
        line, = ax.plot([p["decoder_speedup"] for p in points], [p[metric] for p in points], marker="o",
                        markersize=3, label=label)
        simulated = [p for p in report["thresholds"] if p.get("simulated")]
        if simulated:
            points = sorted([full, *simulated], key=lambda p: p["mean_exit_layer"], reverse=True)
            ax.plot([full["mean_exit_layer"] / p["mean_exit_layer"] for p in points], [p[metric] for p in points],
                    linestyle="--", marker="x", markersize=3, color=line.get_color(),
                    label=f"{label}, simulated exits (layer-count speedup)")
    any_simulated = any(p.get("simulated") for report in reports for p in report["thresholds"])
    ax.set_xlabel("decoder speedup over full depth (x): measured" + ("; dashed: layer count" if any_simulated else ""))
    ax.set_ylabel("CIDEr-D" if metric == "ciderD" else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Early exit: caption quality against wall-clock speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
