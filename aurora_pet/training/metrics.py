"""Per-epoch metrics: ``metrics.csv`` and ``metrics.json`` (rewritten atomically each epoch from the
history kept in the training state, so a resumed run never duplicates or loses a row), and at the end
``metrics.png``: training loss and the main metric per epoch."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_file, atomic_text

MAIN_METRIC = "agg_metrics"  # LAVIS: retrieval mean of text R@1/5/10; VQA overall accuracy


def flatten(split: str, log: dict[str, Any] | None) -> dict[str, Any]:
    """``{"txt_r1": 50.0}`` from split "val" → ``{"val_txt_r1": 50.0}``, numbers as floats."""
    out = {}
    for key, value in (log or {}).items():
        try:
            out[f"{split}_{key}"] = float(value)
        except (TypeError, ValueError):
            out[f"{split}_{key}"] = value
    return out


def write_metrics(output_dir: Path, history: list[dict[str, Any]], final: dict[str, Any] | None = None) -> None:
    columns: list[str] = []
    rows = history + ([final] if final else [])
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_text(output_dir / "metrics.csv", buffer.getvalue())
    atomic_text(output_dir / "metrics.json", json.dumps({"epochs": history, "final": final}, indent=2) + "\n")


def main_metric_split(history: list[dict[str, Any]]) -> str | None:
    for split in ("val", "test"):
        if any(f"{split}_{MAIN_METRIC}" in row for row in history):
            return split
    return None


METRIC_NAMES = {"retrieval": "mean image→text R@1/5/10", "vqa": "VQA accuracy"}


def plot_metrics(output_dir: Path, history: list[dict[str, Any]], final: dict[str, Any] | None,
                 title: str = "", task: str = "") -> Path:
    """Loss and the main metric per epoch (the final test result as a marker) in ``metrics.png``.
    Epochs are counted from 1 here (LAVIS's logs and metrics.csv count from 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(row["epoch"] + 1, row[key]) for row in history
                  if isinstance(row.get(key), float) and math.isfinite(row[key])]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    epochs, loss = series("train_loss")
    ax_loss.plot(epochs, loss, marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    split = main_metric_split(history)
    if split:
        epochs, values = series(f"{split}_{MAIN_METRIC}")
        ax_metric.plot(epochs, values, marker="o", label=f"{split} {MAIN_METRIC}")
    test_value = (final or {}).get(f"test_{MAIN_METRIC}")
    if isinstance(test_value, float):
        at = final.get("best_epoch") if final.get("epoch") == "best" else final.get("epoch")
        if not isinstance(at, int):
            at = history[-1]["epoch"] if history else 0
        which = "best epoch" if final.get("epoch") == "best" else "last epoch"
        ax_metric.plot([at + 1], [test_value], marker="*", markersize=14, linestyle="none",
                       label=f"test ({which})")
    ax_metric.set(xlabel="epoch", ylabel=METRIC_NAMES.get(task, MAIN_METRIC), title=f"main metric ({MAIN_METRIC})")
    if ax_metric.lines:
        ax_metric.legend()
    for axis in (ax_loss, ax_metric):
        axis.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = output_dir / "metrics.png"
    try:
        atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path
