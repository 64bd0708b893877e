"""Argument types and checks shared by the ``ssmkit`` subcommands (the CLI boundary validates once).

Each type raises ``argparse.ArgumentTypeError`` with a one-line reason, which argparse prints under the
subcommand's usage; each ``check_*`` raises ValueError naming the flag, which ``ssmkit.cli.main`` prints
as ``error: …``.
"""

from __future__ import annotations

import argparse
import math

from ssmkit.utils import parse_list


def int_list(name: str, minimum: int | None = None):
    """An argparse type: "64,128,256" -> [64, 128, 256], each >= ``minimum``."""

    def parse(text: str) -> list[int]:
        try:
            values = parse_list(text, int, name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{name}: ")) from None
        if minimum is not None and any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= {minimum}, got {text!r}")
        return values

    return parse


def int_at_least(minimum: int):
    """An argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def check_range(name: str, value: float, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    """ValueError naming the flag unless lo <= value <= hi (lo < value when ``lo_open``); NaN fails."""
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = "]" if hi != math.inf else ")"
        raise ValueError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {value:g}")


def check_device(name: str, device: str) -> None:
    """ValueError naming the flag when ``device`` is not a torch device or is not available here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}: {device!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"{name}: device type {dev.type!r} is not supported (expected cpu or cuda)")
