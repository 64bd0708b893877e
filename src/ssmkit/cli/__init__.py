"""The ``ssmkit`` command. Thin: argument parsing only; each subcommand lives in its own module here
and exposes ``add_parser(subparsers)`` (which sets ``func``) — the work is done by library code.

Errors: a user error — ``ValueError`` (bad values, bad files) or ``OSError`` (missing, unreadable or
unwritable paths, a full disk: FileNotFoundError, NotADirectoryError, PermissionError, …) — is printed as
one line ``error: …`` on stderr with exit status 1. Anything else is a bug and keeps its traceback.
``--debug`` (or ``SSMKIT_DEBUG=1``) shows the traceback of user errors too. Ctrl-C (KeyboardInterrupt)
prints "interrupted" and exits 130. Usage errors (a misspelt
flag, a bad flag value) print the usage of the subcommand they occur in and exit 2, as argparse does.
"""

import argparse
import os
import sys
from importlib import import_module

# Subcommand modules, in the order `ssmkit --help` lists them.
COMMANDS = ["demo", "train", "eval", "generate", "bench", "convert", "serve", "kernels"]

# Exceptions that mean "the input was wrong", not "ssmkit is wrong" (see the module docstring).
USER_ERRORS = (ValueError, OSError)


def _subparsers(parser: argparse.ArgumentParser):
    """Every parser below ``parser`` (subcommands, and their subcommands), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield sub
                yield from _subparsers(sub)


def build_parser() -> argparse.ArgumentParser:
    import ssmkit

    parser = argparse.ArgumentParser(
        prog="ssmkit",
        description="State space models (S4, S4D, Mamba, Mamba-2) on PyTorch: learn, train, run, serve, "
        "benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"ssmkit {ssmkit.__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of errors (also: SSMKIT_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        import_module(f"ssmkit.cli.{name}").add_parser(sub)
    parser.allow_abbrev = False
    for p in _subparsers(parser):
        # each parser knows itself (so a misspelt flag gets the usage of the subcommand it was typed in),
        # takes --debug anywhere on the line, and accepts no abbreviated flags (an unambiguous prefix such
        # as --ctx for --context would otherwise be a silent alias)
        p.allow_abbrev = False
        p.set_defaults(_parser=p)
        if "--debug" not in p._option_string_actions:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get("SSMKIT_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention


if __name__ == "__main__":
    sys.exit(main())
