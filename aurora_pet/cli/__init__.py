"""The `aurora-pet` command line: `params`, `train`, `demo`.

Each subcommand lives in `aurora_pet.cli.<name>` with `add_arguments(parser)` and
`run(args) -> int`; only the chosen one is imported, so `aurora-pet params` does not load the
training stack. A subcommand whose extra is not installed says what to install (exit code 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "params": "print the trainable-parameter table of a BLIP configuration, LAVIS or transformers (no download)",
    "train": "train and evaluate a recipe with an Aurora adapter (LAVIS's runner, or accelerate for family: hf)",
    "demo": "run the embedded demo end to end on the CPU (generated data, a tiny LAVIS or transformers BLIP, no "
            "download)",
}
# The optional dependencies (pyproject.toml) a subcommand runs on by default; `params`, `train` for an hf
# recipe and `demo --family hf` report a missing family themselves.
EXTRAS = {"train": "lavis", "demo": "lavis"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="aurora-pet", description="Aurora mode-approximation adapters for BLIP.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            importlib.import_module(f"aurora_pet.cli.{name}").add_arguments(sub)
    args = parser.parse_args(argv)
    return run_command(args.command, args)


def run_command(name: str, args: argparse.Namespace) -> int:
    """Run subcommand ``name``; a third-party module of its extra that is missing is named, with the install
    command, instead of a traceback (a missing ``aurora_pet`` module is a bug and is raised)."""
    try:
        return importlib.import_module(f"aurora_pet.cli.{name}").run(args)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if name not in EXTRAS or not missing or missing.split(".")[0] == "aurora_pet":
            raise
        extra = EXTRAS[name]
        print(f"aurora-pet {name}: error: it needs the {extra} extra, and the module {missing!r} is not installed: "
              f"pip install 'aurora-pet[{extra}]'", file=sys.stderr)
        return 2


