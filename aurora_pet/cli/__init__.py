"""The `aurora-pet` command line: `params`, `train`, `demo`.

Each subcommand lives in `aurora_pet.cli.<name>` with `add_arguments(parser)` and
`run(args) -> int`; only the chosen one is imported, so `aurora-pet params` does not load the
training stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "params": "print the trainable-parameter table of a BLIP configuration, LAVIS or transformers (no download)",
    "train": "train and evaluate a recipe with LAVIS's runner and an Aurora adapter",
    "demo": "run the embedded demo end to end on the CPU (generated data, tiny BLIP, no download)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="aurora-pet", description="Aurora mode-approximation adapters for BLIP.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            importlib.import_module(f"aurora_pet.cli.{name}").add_arguments(sub)
    args = parser.parse_args(argv)
    return importlib.import_module(f"aurora_pet.cli.{args.command}").run(args)


