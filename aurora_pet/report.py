"""Parameter accounting: trainable parameters per group, against the base model and against peers.

One source of truth: `parameter_report` (and `add_comparisons`) compute the numbers, `report_rows` turns
them into the rows that the text table, the CSV and the JSON of `aurora-pet params` all print.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .model import AuroraModel


class Row(NamedTuple):
    name: str  # stable key for tools: factors, ice, gqt, heads, total, lora, full_finetuning
    label: str  # what the table shows
    parameters: int
    percent_of_base: float


def count(parameters: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def parameter_report(model: "AuroraModel", base_exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Trainable parameters per group (factors, ice, gqt, heads), total, and % of the base model.

    `base_exclude` lists module-name prefixes left out of the base count, e.g. BLIP's momentum copies,
    which duplicate the online encoders and are never trained.
    """
    fusion = model.aurora_fusion.values()
    groups = {
        "factors": count(model.aurora_factors.parameters()),
        "ice": sum(count(site.ice.parameters()) for site in fusion if site.ice is not None),
        "gqt": sum(count(site.gqt.parameters()) for site in fusion if site.gqt is not None),
        "heads": count(p for m in model.heads.values() for p in m.parameters() if p.requires_grad),
    }
    everything = count(model.base_model.parameters())
    base = sum(p.numel() for n, p in model.base_model.named_parameters()
               if not any(n == e or n.startswith(e + ".") for e in base_exclude))
    trainable = sum(groups.values())
    return {
        "groups": groups,
        "trainable": trainable,
        "base": base,
        "base_excludes": list(base_exclude),
        "base_excluded_parameters": everything - base,
        "percent_of_base": _percent(trainable, base),
        "slice_size": model.slice_size,
        "width_classes": {"out": list(model.aurora_factors.out_widths), "in": list(model.aurora_factors.in_widths)},
        "num_slices": model.num_slices,
        "num_targets": len(model.layers),
        "heads": list(model.heads),
        "rank": model.aurora_config.rank,
        "core": model.aurora_config.core,
    }


def lora_parameter_count(model: "AuroraModel", rank: int) -> int:
    """What LoRA at `rank` on the same targets would train: r·(d_in + d_out) per target."""
    return sum(rank * (layer.module.in_features + layer.module.out_features) for layer in model.layers.values())


def add_comparisons(report: dict[str, Any], model: "AuroraModel", lora_rank: int) -> dict[str, Any]:
    """The report plus what peers train: LoRA at `lora_rank` on the same targets with the same heads,
    and full fine-tuning (every base parameter, so the momentum copies stay out here too)."""
    lora = lora_parameter_count(model, lora_rank) + report["groups"]["heads"]
    return {**report, "comparisons": {"lora": {"rank": lora_rank, "trainable": lora},
                                      "full_finetuning": {"trainable": report["base"]}}}


def report_rows(report: dict[str, Any]) -> list[Row]:
    """The groups, the total, then any comparisons, each with its share of the base model."""
    groups = report["groups"]
    heads = f"heads: {', '.join(report['heads'])}" if report["heads"] else "heads"
    rows = [("factors", f"factors ({report['core']}, R={report['rank']}, M={report['num_slices']})"),
            ("ice", "ICE"), ("gqt", "GQT"), ("heads", heads)]
    counts = [(name, label, groups[name]) for name, label in rows]
    counts.append(("total", "total trainable", report["trainable"]))
    if "comparisons" in report:  # see add_comparisons
        lora, full = report["comparisons"]["lora"], report["comparisons"]["full_finetuning"]
        counts.append(("lora", f"LoRA r={lora['rank']}, same targets + heads", lora["trainable"]))
        counts.append(("full_finetuning", "full fine-tuning", full["trainable"]))
    return [Row(name, label, n, _percent(n, report["base"])) for name, label, n in counts]


def format_report(report: dict[str, Any]) -> str:
    """A small table: one row per group, the total, any comparisons, and the base model's size."""
    rows = report_rows(report)
    width = max(len(row.label) for row in rows) + 2
    widths = report.get("width_classes", {})
    other = "".join(f" + {side} widths {', '.join(map(str, widths[side]))}"
                    for side in ("out", "in") if widths.get(side))
    lines = [f"Aurora {report['core']} R={report['rank']}  d={report['slice_size']}{other}  "
             f"M={report['num_slices']} slices in {report['num_targets']} target modules",
             f"{'group':<{width}}{'parameters':>14}{'% of base':>12}"]
    for row in rows:
        if row.name == "lora":
            lines.append("compared with")
        lines.append(f"{row.label:<{width}}{row.parameters:>14,}{row.percent_of_base:>11.4f}%")
    lines.append(f"{'base model':<{width}}{report['base']:>14,}")
    if report["base_excludes"]:
        lines.append(f"The base count leaves out the momentum copies {', '.join(report['base_excludes'])} "
                     f"({report['base_excluded_parameters']:,} parameters): they are never trained.")
    return "\n".join(lines)


def _percent(n: int, base: int) -> float:
    return 100.0 * n / base if base else 0.0
