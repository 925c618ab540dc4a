"""Parameter accounting: trainable parameters per group, against the base model and against peers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .model import AuroraModel


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
    base = sum(p.numel() for n, p in model.base_model.named_parameters()
               if not any(n == e or n.startswith(e + ".") for e in base_exclude))
    trainable = sum(groups.values())
    return {
        "groups": groups,
        "trainable": trainable,
        "base": base,
        "base_excludes": list(base_exclude),
        "percent_of_base": 100.0 * trainable / base if base else 0.0,
        "slice_size": model.slice_size,
        "num_slices": model.num_slices,
        "num_targets": len(model.layers),
        "rank": model.config.rank,
        "core": model.config.core,
    }


def lora_parameter_count(model: "AuroraModel", rank: int) -> int:
    """What LoRA at `rank` on the same targets would train: r·(d_in + d_out) per target."""
    return sum(rank * (layer.module.in_features + layer.module.out_features) for layer in model.layers.values())


def format_report(report: dict[str, Any]) -> str:
    """A small table: one row per group, then the total with its share of the base model."""
    base = report["base"]
    rows = [(name, n) for name, n in report["groups"].items()] + [("total trainable", report["trainable"])]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"Aurora {report['core']} R={report['rank']}  d={report['slice_size']}  "
             f"M={report['num_slices']} slices in {report['num_targets']} target modules",
             f"{'group':<{width}}{'parameters':>14}{'% of base':>12}"]
    lines += [f"{name:<{width}}{n:>14,}{100.0 * n / base if base else 0:>11.4f}%" for name, n in rows]
    lines.append(f"{'base model':<{width}}{base:>14,}")
    if report["base_excludes"]:
        lines.append(f"(the base count leaves out the momentum copies {', '.join(report['base_excludes'])})")
    return "\n".join(lines)
