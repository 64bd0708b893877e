"""The ``ssmkit`` command. Thin: argument parsing only; each subcommand lives in its own module here
and exposes ``add_parser(subparsers)`` (which sets ``func``) — the work is done by library code."""

import argparse
import sys
from importlib import import_module

# Subcommand modules, in the order `ssmkit --help` lists them.
COMMANDS = ["demo", "train", "eval", "generate", "bench", "convert", "kernels"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssmkit",
        description="State space models (S4, S4D, Mamba) on PyTorch: learn, train, run, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        import_module(f"ssmkit.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
