"""`aurora-pet params`: how many parameters an Aurora configuration trains on a BLIP architecture.

The real architecture of the chosen model family (`lavis` or `hf`) is built with random weights (nothing
is downloaded) and wrapped exactly as training wraps it, so the counts are those of a run, not of a
formula. The base model is counted without BLIP retrieval's momentum copies (LAVIS), which are never
trained; the output says so. Arguments are checked before anything is built.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import importlib.util
import io
import json
import re
import sys
from typing import Any

import torch
from torch import nn

from ..config import CORES, AuroraConfig
from ..errors import AuroraConfigError, AuroraError
from ..families import FAMILY_NAMES, get_family
from ..families.lavis.video_names import VIDEO_ARCHITECTURES, image_architecture
from ..report import add_comparisons, format_report, report_rows

FAMILIES = FAMILY_NAMES
# hf has the first four, lavis blip_retrieval, blip_vqa and the video architectures (8 frames)
ARCHS = ("blip_retrieval", "blip_vqa", "blip_captioning", "blip2", "blip_video_retrieval", "blip_video_qa")
DEFAULT_PRESET = "cross-attention"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="model family: lavis (Salesforce LAVIS) or hf (transformers); default: lavis where "
                             "LAVIS is installed, else hf")
    parser.add_argument("--arch", choices=ARCHS, default="blip_retrieval", help="architecture (default blip_retrieval)")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--preset", help=f"target preset: {DEFAULT_PRESET} (default), text-attention, reference, "
                                          "or a full name such as blip_vqa/reference")
    targets.add_argument("--targets", help="modules to adapt instead of a preset's: a regex (full match on module "
                                           "names) or a comma-separated list of module-name suffixes; the heads "
                                           "and ICE/GQT sites stay the architecture's")
    parser.add_argument("--rank", type=int, default=64, help="R, the rank of the shared factors (default 64)")
    parser.add_argument("--core", choices=CORES, default="cp", help="cp (the method) or tucker")
    parser.add_argument("--no-ice", action="store_true", help="without Informative Context Enhancement")
    parser.add_argument("--no-gqt", action="store_true", help="without Gated Query Transformation")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA comparison row (default 8)")
    parser.add_argument("--size", choices=("base", "tiny"), default="base",
                        help="base: BLIP-base exactly (default); tiny: the test-size model")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the full report as JSON")
    output.add_argument("--csv", action="store_true", help="print the table as CSV")


def run(args: argparse.Namespace) -> int:
    try:
        family_name = args.family or default_family()
        family = get_family(family_name)
        arch = architecture(family_name, image_architecture(args.arch))
        config = config_from_args(args, arch)
        if args.arch in VIDEO_ARCHITECTURES:
            arch, config = args.arch, video_config(family_name, args.arch, config)
        if args.lora_rank < 1:
            raise AuroraConfigError(f"--lora-rank must be a positive integer, got {args.lora_rank}")
        d = family.width(arch, args.size)
        if args.rank > d:
            raise AuroraConfigError(f"--rank {args.rank} exceeds the slice size d={d} of {args.size} {arch}; "
                                    f"choose 1 ≤ rank ≤ {d}")
        print(f"Building {family.title} {arch} ({args.size} architecture) with random weights, nothing downloaded ...",
              file=sys.stderr, flush=True)
        model = build_model(family_name, arch, args.size)
        report = parameter_table(model, config, args.lora_rank)
    except (AuroraError, ImportError) as error:
        print(f"aurora-pet params: error: {error}", file=sys.stderr)
        return 2
    report["model"] = {"family": family_name, "arch": arch, "size": args.size}
    if report["trainable"] > report["adapted_parameters"]:
        print(f"warning: this adapter trains {report['trainable']:,} parameters, more than the "
              f"{report['adapted_parameters']:,} of the modules it adapts: lower --rank", file=sys.stderr)
    print(render(report, "json" if args.json else "csv" if args.csv else "text"))
    return 0


def default_family() -> str:
    return "lavis" if importlib.util.find_spec("lavis") is not None else "hf"


def architecture(family: str, arch: str) -> str:
    """The family's name of `arch`: transformers architectures carry an `hf_` prefix."""
    name = f"hf_{arch}" if family == "hf" else arch
    known = get_family(family).architectures
    if name not in known:
        raise AuroraConfigError(f"--arch {arch} is not a {family} architecture; {family} has "
                                f"{', '.join(a.removeprefix('hf_') for a in known)}")
    return name


def video_config(family: str, arch: str, config: AuroraConfig) -> AuroraConfig:
    """The image preset's config with the frame embedding τ trained beside the adapter (as the video
    recipes train it, `wrap_blip_video`)."""
    if family != "lavis":
        raise AuroraConfigError(f"--arch {arch} is a LAVIS video architecture; use --family lavis")
    from ..families.lavis.video import FRAME_EMBEDDING

    return AuroraConfig.from_dict({**config.to_dict(),
                                   "modules_to_save": [*(config.modules_to_save or []), FRAME_EMBEDDING]})


def config_from_args(args: argparse.Namespace, arch: str) -> AuroraConfig:
    """The preset's config (targets, ICE/GQT sites, heads) with the command line's changes."""
    preset = args.preset or DEFAULT_PRESET
    name = preset if "/" in preset else f"{arch}/{preset}"
    family = get_family(args.family or default_family())
    own = [p for p in family.presets if p.startswith(arch + "/")]
    if name not in family.presets:
        close = difflib.get_close_matches(name, own, 3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise AuroraConfigError(f"unknown preset {name!r}{hint}; presets for {arch}: {', '.join(own)}")
    if not name.startswith(arch + "/"):
        raise AuroraConfigError(f"preset {name!r} is for {family.presets[name].architecture}, not --arch "
                                f"{arch.removeprefix('hf_')}; presets for {arch}: {', '.join(own)}")
    overrides: dict[str, Any] = {"rank": args.rank, "core": args.core}
    if args.no_ice:
        overrides["ice"] = False
    if args.no_gqt:
        overrides["gqt"] = False
    if args.targets is not None:
        overrides["target_modules"] = parse_targets(args.targets)
    return AuroraConfig.from_preset(name, **overrides)


def parse_targets(text: str) -> str | list[str]:
    """Plain dotted names separated by commas are a list of name suffixes; anything else is a regex."""
    if re.fullmatch(r"[\w.]+(,[\w.]+)*", text):
        return text.split(",")
    return text


def build_model(family: str, arch: str, size: str) -> nn.Module:
    """The architecture with random weights; on the meta device where the family allows (counting needs
    shapes only: BLIP-2 with OPT-2.7b is 3.7 billion parameters)."""
    builder = get_family(family)
    if builder.builds_on_meta:
        with torch.device("meta"):
            return builder.build(arch, size)
    return builder.build(arch, size)


def parameter_table(model: nn.Module, config: AuroraConfig, lora_rank: int) -> dict[str, Any]:
    """The report of `model` wrapped with `config`, with the LoRA and full fine-tuning comparisons.

    The wrapping is undone afterwards (the model can be counted again with another config)."""
    from ..model import get_aurora_model

    aurora = get_aurora_model(model, config)
    try:
        report = add_comparisons(aurora.parameter_report(), aurora, lora_rank)
        report["adapted_parameters"] = sum(layer.module.weight.numel() for layer in aurora.layers.values())
    finally:
        aurora.unload()
    return {**report, "config": config.to_dict()}


def render(report: dict[str, Any], fmt: str) -> str:
    rows = report_rows(report)
    if fmt == "json":
        return json.dumps({**report, "rows": [row._asdict() for row in rows]}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name", "label", "parameters", "percent_of_base"])
        writer.writerows([row.name, row.label, row.parameters, f"{row.percent_of_base:.6f}"] for row in rows)
        writer.writerow(["base", "base model", report["base"], f"{100.0:.6f}"])
        return out.getvalue().rstrip("\n")
    model = report["model"]
    config = report["config"]
    switches = f"ICE {'on' if config['ice'] else 'off'}, GQT {'on' if config['gqt'] else 'off'}"
    title = (f"{get_family(model['family']).title} {model['arch']}, {model['size']} architecture with random weights; "
             f"targets {config['target_modules']}; {switches}")
    return title + "\n" + format_report(report)
