"""``aurora-pet demo``: the embedded demo end to end on the CPU (generated data, tiny BLIP, no download)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"),
                        help="where data, recipe, run, adapter and plot go (an earlier demo's output there "
                             "is replaced; default: outputs/demo)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the pre-trained tiny BLIP is cached (default: $AURORA_PET_CACHE or "
                             "~/.cache/aurora-pet)")
    parser.add_argument("--epochs", type=int, default=None, help="adaptation epochs (default: the demo's)")
    parser.add_argument("--verbose", action="store_true", help="show LAVIS's logging and progress lines")


def run(args: argparse.Namespace) -> int:
    from ..errors import AuroraError

    try:
        from ..demo import run_demo

        run_demo(args.output_dir, args.cache_dir, epochs=args.epochs, verbose=args.verbose)
    except (AuroraError, FileNotFoundError, FileExistsError) as error:
        print(f"aurora-pet demo: error: {error}", file=sys.stderr)
        return 2
    return 0
