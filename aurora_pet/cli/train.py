"""``aurora-pet train --cfg-path recipes/<name>.yaml [--options k=v ...] [--resume]``.

The same entry point as ``recipes/train.py`` (which ``torchrun`` launches). The recipe's ``family:`` picks the
runner: LAVIS's runner with the recipe's model built offline and wrapped by Aurora (``lavis``, the default),
or the accelerate loop over a transformers BLIP (``hf``; launch several processes with ``torchrun`` or
``accelerate launch``). See recipes/README.md.
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
    from ..training.recipe import recipe_family

    family = None
    try:
        family = recipe_family(args.cfg_path, args.options)
        if family == "hf":
            from ..training.hf_train import train
        else:
            from ..training import train
        train(args.cfg_path, args.options, resume=args.resume)
    except (AuroraError, FileNotFoundError) as error:
        print(f"aurora-pet train: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        if family != "hf":
            raise  # the lavis extra: named by run_command
        return _missing(error, family)
    return 0


def _missing(error: ImportError, family: str) -> int:
    """The family's extra is missing a module or has the wrong version of one: say what to install (a missing
    ``aurora_pet`` module is a bug and is raised)."""
    if not isinstance(error, ModuleNotFoundError):  # a version check's own message says what to install
        print(f"aurora-pet train: error: {error}", file=sys.stderr)
        return 2
    if not error.name or error.name.split(".")[0] == "aurora_pet":
        raise error
    print(f"aurora-pet train: error: recipes of the {family} family need the {family} extra, and the module "
          f"{error.name!r} is not installed: pip install 'aurora-pet[{family}]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``recipes/train.py``: the subcommand without the ``aurora-pet`` front end."""
    from . import run_command

    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command("train", parser.parse_args(argv))
