"""``aurora-pet train --cfg-path recipes/<name>.yaml [--options k=v ...] [--resume]``.

The same entry point as ``recipes/train.py`` (which ``torchrun`` launches): LAVIS's runner with the
recipe's model built offline and wrapped by Aurora. See recipes/README.md.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", required=True, help="the recipe yaml (LAVIS project style + aurora:)")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override recipe settings, e.g. run.max_epoch=1 aurora.rank=32 (LAVIS style)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in run.output_dir from its latest checkpoint")


def run(args: argparse.Namespace) -> int:
    from ..errors import AuroraError

    try:
        from ..training import train

        train(args.cfg_path, args.options, resume=args.resume)
    except (AuroraError, FileNotFoundError) as error:
        print(f"aurora-pet train: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``recipes/train.py``: the subcommand without the ``aurora-pet`` front end."""
    from . import run_command

    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command("train", parser.parse_args(argv))
