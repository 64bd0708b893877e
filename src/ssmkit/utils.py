"""Helpers every layer of ssmkit uses, kept once (the bottom of the import graph: imports no ssmkit module).

atomic_write(path)           write a file so that a crash or a kill leaves the old file or the new one,
                             never a torn one (temporary file in the same folder, fsync, rename)
atomic_save(path, writer)    the same for libraries that write to a path (safetensors, matplotlib)
remove_stale_temps(folder)   delete the temporary files a killed atomic write left behind
count_parameters(model)      number of distinct parameters (a tied weight counts once)
parse_list(text, kind)       "1,2,4" -> [1, 2, 4], with a one-line error naming the argument
config_from_dict(cls, data)  build a config dataclass from a JSON dict: unknown keys and wrong types
                             are one ValueError naming the file, the key, the expected and the received
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".ssmkit-tmp"  # every temporary file of an atomic write ends with this


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file beside ``path`` for writing; on success fsync it and rename it onto ``path``.

    The file gets the usual permissions (0666 minus the umask, as ``open`` would give), not mkstemp's 0600.
    On an exception the temporary file is removed and ``path`` is untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = {"encoding": encoding} if mode == "w" else {}
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` (after an fsync) on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result onto ``path`` atomically; returns ``path``.

    For writers that need a file name, e.g. ``atomic_save(p, lambda t: save_file(state, t))``; the
    temporary name keeps ``path``'s suffix so that writers that pick a format by suffix (matplotlib) work.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        named = tmp.with_name(tmp.name + path.suffix)
        try:
            writer(named)
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes that a kill interrupted in ``folder``; returns them.

    Only call this where no other live process can be writing into ``folder`` (e.g. under its lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX) or TEMP_SUFFIX + "." in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def count_parameters(model) -> int:
    """Number of distinct parameters of an ``nn.Module`` (a weight shared by two modules counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parse_list(text: str, kind: type = int, name: str = "value") -> list:
    """Parse a comma-separated list ("64,128,256"); ValueError naming ``name`` on a bad or empty item.

    ``kind`` is int, float or str; a trailing ",…" or ",..." (as in "64,128,...") is ignored.
    """
    items = [s.strip() for s in str(text).split(",")]
    items = [s for s in items if s and s not in ("…", "...")]
    if not items:
        raise ValueError(f"{name}: expected a comma-separated list, got {text!r}")
    out = []
    for s in items:
        try:
            out.append(kind(s))
        except ValueError:
            raise ValueError(
                f"{name}: expected a comma-separated list of {kind.__name__}, got {s!r}"
            ) from None
    return out


def _type_ok(value, annotation) -> bool:
    """Whether a JSON value fits a dataclass field annotation (int, float, bool, str, list, Optional)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list):  # JSON has only arrays: a tuple field accepts a list
        return isinstance(value, (list, tuple))
    if origin is not None:
        annotation = origin
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # anything else (typing.Any, forward refs): not checked here


def config_from_dict(cls, data, where: str = "config", ignore: tuple[str, ...] = ()):
    """Build the dataclass ``cls`` from a JSON object, strictly.

    Unknown keys (other than ``ignore``) and values of the wrong JSON type raise one ValueError that
    names ``where`` (e.g. the config.json path), the key, the expected type and the value received;
    ``__post_init__`` then validates ranges as usual.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known) - set(ignore))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for {cls.__name__} (known: {sorted(known)})")
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            continue
        if not _type_ok(value, known[key]):
            raise ValueError(
                f"{where}: {key} must be of type {getattr(known[key], '__name__', known[key])}, "
                f"got {value!r} ({type(value).__name__})"
            )
        kwargs[key] = value
    return cls(**kwargs)
