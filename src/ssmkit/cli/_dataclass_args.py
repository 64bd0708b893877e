"""Dataclass -> argparse flags (``field_name`` -> ``--field-name``); the field docstrings are the help."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing


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


def _parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_dataclass_args(parser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (bool fields become ``--flag/--no-flag``)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse %-formats help
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(
                flag, action=__import__("argparse").BooleanOptionalAction, default=default, help=help_
            )
        elif typing.get_origin(hint) is list:
            parser.add_argument(flag, type=_parse_list, default=default, help=help_ + " comma-separated")
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=float, nargs=2, default=default, help=help_)
        elif hint == (float | None):
            parser.add_argument(flag, type=float, default=default, help=help_)
        elif hint == (int | None):
            parser.add_argument(flag, type=int, default=default, help=help_)
        else:
            parser.add_argument(flag, type=hint, default=default, help=help_)


def dataclass_from_args(cls, args, skip: tuple[str, ...] = ()):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip})
