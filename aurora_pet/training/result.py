"""What a finished run returns and prints, the same for both model families' ``train()``: ``TrainResult``, the
parameter table printed before training and the summary printed after."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["TrainResult", "print_parameter_report", "print_summary"]


@dataclass
class TrainResult:
    output_dir: Path
    weights_dir: Path | None  # the adapter (or, without aurora:, the trained weights) used for the test
    plot: Path | None
    history: list[dict[str, Any]]  # one row per epoch: train_loss, val_/test_ metrics
    final: dict[str, Any] | None  # the final test metrics, "test_<name>"
    parameter_report: dict[str, Any] | None
    model: nn.Module = field(repr=False)  # as after the final evaluation (best weights loaded)
    resumed_from: Path | None = None

    @property
    def main_metric(self) -> float | None:
        return (self.final or {}).get("test_agg_metrics")


def print_parameter_report(model: nn.Module, quiet: bool) -> dict[str, Any] | None:
    """The Aurora model's parameter report (None for full fine-tuning), printed unless ``quiet``."""
    from ..model import AuroraModel
    from ..report import format_report

    if not isinstance(model, AuroraModel):
        if not quiet:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"full fine-tuning (no aurora: section): {trainable:,} trainable parameters")
        return None
    report = model.parameter_report()
    if not quiet:
        print(format_report(report))
    return report


def print_summary(result: TrainResult) -> None:
    """Where the run's output went and its final metrics."""
    print(f"output: {result.output_dir}")
    if result.final:
        metrics = {k: v for k, v in result.final.items() if k != "epoch"}
        print("final evaluation (" + str(result.final.get("epoch")) + "): "
              + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    if result.weights_dir:
        print(f"weights: {result.weights_dir}")
    if result.plot:
        print(f"plot: {result.plot}")
