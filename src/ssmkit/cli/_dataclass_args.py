"""Dataclass -> argparse flags (``field_name`` -> ``--field-name``); the field docstrings are the help.

A field listed in ``task_defaults`` gets the flag default None and both defaults in its help, so that the
command can tell "not given" from a value and fill in the default of the task it runs (``ssmkit train``:
the synthetic tasks' and ``--task lm``'s). ``flag_error`` turns a config's ValueError that starts with a
field name ("ckpt_every: expected >= 0, got -1") into one that names the flag.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import typing
from collections.abc import Iterator
from functools import partial

from ssmkit.utils import parse_list


def field_docs(cls) -> dict[str, str]:
    """The string literal that follows each annotated field in the class body (the field's docstring)."""
    tree = ast.parse(inspect.getsource(cls).lstrip())
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
            if (
                isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = b.value.value
    return docs


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _list_of(kind: type, name: str, text: str) -> list:
    try:
        return parse_list(text, kind, flag(name))
    except ValueError as e:  # argparse prefixes "argument --name: " itself
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag(name)}: ")) from None


def add_dataclass_args(
    parser, cls, skip: tuple[str, ...] = (), task_defaults: dict[str, str] | None = None
) -> None:
    """One flag per field of ``cls`` (bool fields become ``--flag/--no-flag``).

    ``task_defaults``: {field: "--task lm: VALUE"} for fields whose default depends on the task; those
    flags default to None (see the module docstring).
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    task_defaults = task_defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f"{default}; {task_defaults[f.name]}" if f.name in task_defaults else f"{default}"
        help_ = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%")  # argparse %-formats help
        if f.name in task_defaults:
            default = None
        hint = hints[f.name]
        name = flag(f.name)
        if hint is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(hint) is list:
            (kind,) = typing.get_args(hint)
            parser.add_argument(
                name, type=partial(_list_of, kind, f.name), default=default, help=help_ + " comma-separated"
            )
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(name, type=float, nargs=2, default=default, help=help_)
        elif hint == (float | None):
            parser.add_argument(name, type=float, default=default, help=help_)
        elif hint == (int | None):
            parser.add_argument(name, type=int, default=default, help=help_)
        elif hint == (str | None):
            parser.add_argument(name, type=str, default=default, help=help_)
        else:
            parser.add_argument(name, type=hint, default=default, help=help_)


def dataclass_from_args(cls, args, skip: tuple[str, ...] = (), **given):
    """``cls`` from the parsed flags of its fields (``given`` overrides), its ValueErrors naming the flag."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip and f.name not in given]
    values = {**{name: getattr(args, name) for name in names}, **given}
    with flag_error(values):
        return cls(**values)


@contextlib.contextmanager
def flag_error(names) -> Iterator[None]:
    """Re-raise a ValueError / FileNotFoundError "name: …" for ``name`` in ``names`` as "--name: …"."""
    names = set(names)
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        name, sep, rest = str(e).partition(":")
        if type(e) in (ValueError, FileNotFoundError) and sep and name in names:
            raise type(e)(f"{flag(name)}:{rest}") from None
        raise
