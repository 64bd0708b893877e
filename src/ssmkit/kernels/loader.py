"""The one loader of ssmkit's C++ extensions: a content-keyed cache, lock-free loads, a build lock that
cannot go stale.

Reference: ``torch.utils.cpp_extension`` (which compiles here) and its ``_import_module_from_library``
(``importlib`` on the built file — what a load does, without the build-directory lock torch takes on every
``load()`` call). POSIX ``fcntl.flock``: an advisory lock held by an open file description, released by
the kernel when the holder exits or is killed.

Glossary:
    Extension       what to build: a name, the sources, the headers, compiler and linker flags
    key             16 hex digits of the SHA-256 of everything the compiled code depends on: the bytes of
                    every source and header, the flags, the compiler's ``--version``, the torch version,
                    the Python ABI tag and the CPU's ISA flags (``-march=native`` code runs only where the
                    ISA matches). Never a path, never the clock: two checkouts share one build.
    build folder    ``<cache>/kernels/<name>-<key>/``; the module file inside it is the build
    lock file       ``<cache>/kernels/<name>-<key>.lock``, ``flock``-ed only while building
    failure record  ``<cache>/kernels/<name>-<key>.failed``: the log of a failed build; later runs fall back
                    at once instead of recompiling for minutes (delete it, or ``ssmkit kernels build``)

A load is three steps:
    1. the module file exists -> import it (no lock: the file appears by an atomic rename, complete);
    2. else take the lock, waiting at most ``SSMKIT_KERNEL_WAIT`` seconds (default 900) — when another live
       process is building, it is said once on stderr; a lock whose holder died is free at once;
    3. under the lock, look again (the other process may have finished), else compile in a private
       temporary folder (saying on stderr what and roughly how long, then the elapsed time) and rename that
       folder into place.
Any failure (no compiler, the wait ran out, a compile error) is a one-line reason; the caller falls back
to pure PyTorch with one warning (:func:`warn_fallback`). Nothing here raises for a missing build.

Environment:
    SSMKIT_CACHE_DIR     cache root (default ``$XDG_CACHE_HOME/ssmkit`` or ``~/.cache/ssmkit``)
    SSMKIT_KERNEL_WAIT   seconds to wait for another process's build before falling back (default 900)
    SSMKIT_NO_CPU_EXT    ``1``: never build or load the C++ kernels (the pure-PyTorch paths run)
    CXX                  the C++ compiler (default ``c++``), as for ``torch.utils.cpp_extension``
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

KEY_VERSION = "1"  # bump when the loader's build recipe changes in a way the key does not see
DEFAULT_WAIT_S = 900.0
_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class Extension:
    """One C++ extension: what is compiled and how."""

    name: str
    """short name, part of the folder and module name ("scan", "conv")"""
    title: str
    """what it is, for messages ("fused selective-scan kernel")"""
    sources: tuple[Path, ...]
    """the compiled ``.cpp`` files"""
    headers: tuple[Path, ...] = ()
    """headers the sources include (their bytes enter the key; their folders the include path)"""
    cflags: tuple[str, ...] = ()
    """compiler flags"""
    ldflags: tuple[str, ...] = ()
    """linker flags"""
    expected_build: str = "about 1-2 minutes"
    """rough compile time, for the message printed while building"""
    builder: Callable[[Extension, str, Path], Path] | None = None
    """``builder(ext, module_name, folder) -> module file``; None: ``torch.utils.cpp_extension`` (tests
    pass a fast fake)"""


@dataclasses.dataclass
class Status:
    """Where one extension stands on this machine (``ssmkit kernels status``)."""

    name: str
    key: str | None
    folder: Path | None
    module_file: Path | None
    built: bool
    reason: str | None
    """why it cannot be used as things are (None when built, or when building would be tried)"""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def cache_root() -> Path:
    """``$SSMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ssmkit``, else ``~/.cache/ssmkit``."""
    explicit = os.environ.get("SSMKIT_CACHE_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "") or str(Path.home() / ".cache")
    return Path(base) / "ssmkit"


def kernels_dir() -> Path:
    return cache_root() / "kernels"


def wait_limit() -> float:
    """The bounded wait for another process's build: ``$SSMKIT_KERNEL_WAIT`` seconds (default 900)."""
    raw = os.environ.get("SSMKIT_KERNEL_WAIT", "")
    if raw == "":
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"SSMKIT_KERNEL_WAIT must be a number of seconds >= 0, got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"SSMKIT_KERNEL_WAIT must be a number of seconds >= 0, got {raw!r}")
    return value


def compiler() -> str:
    """The C++ compiler torch's extension builder uses: ``$CXX`` or ``c++``."""
    return os.environ.get("CXX", "") or "c++"


@functools.cache
def _compiler_version(cxx: str) -> str | None:
    """First line of ``cxx --version``; None when there is no such compiler."""
    if shutil.which(cxx) is None:
        return None
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0] if done.returncode == 0 and first else None


def isa_flags(cpuinfo: str | None = None) -> str:
    """The CPU's instruction-set flags, sorted: the ``flags`` (x86) or ``Features`` (Arm) line of
    ``/proc/cpuinfo`` — never its clock lines (``cpu MHz`` changes under frequency scaling)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        field, _, value = line.partition(":")
        if field.strip() in ("flags", "Features"):
            return " ".join(sorted(set(value.split())))
    return f"{platform.system()} {platform.machine()} {platform.processor()}".strip()


def build_key(ext: Extension, compiler_version: str, isa: str | None = None) -> str:
    """The content key of ``ext``'s build on this machine (see the module docstring)."""
    import torch

    h = hashlib.sha256()
    h.update(f"ssmkit-kernels {KEY_VERSION}\0{ext.name}\0".encode())
    for path in ext.sources + ext.headers:
        data = Path(path).read_bytes()
        h.update(f"{Path(path).name}\0{len(data)}\0".encode())  # the file name, not where it lives
        h.update(data)
    h.update("\0".join(ext.cflags + ("|",) + ext.ldflags).encode())
    h.update(f"\0{compiler_version}\0{torch.__version__}\0{sys.implementation.cache_tag}\0".encode())
    h.update((isa_flags() if isa is None else isa).encode())
    return h.hexdigest()[:16]


def module_name(ext: Extension, key: str) -> str:
    return f"ssmkit_{ext.name}_{key}"


def _suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[-1]  # ".so" (what cpp_extension writes)


def _paths(ext: Extension, key: str) -> tuple[Path, Path, Path]:
    """(build folder, lock file, failure record)."""
    root = kernels_dir()
    stem = f"{ext.name}-{key}"
    return root / stem, root / f"{stem}.lock", root / f"{stem}.failed"


def _find_module_file(folder: Path, name: str) -> Path | None:
    for suffix in (_suffix(), ".py"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _import_file(name: str, path: Path):
    """Import the built module file (what torch's loader does after its locked build step)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _say(message: str) -> None:
    print(f"ssmkit: {message}", file=sys.stderr, flush=True)


def _holder(lock_path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = lock_path.read_text().strip()
        if text:
            return f"pid {int(text.split()[0])}"
    return "another process"


@contextlib.contextmanager
def build_lock(lock_path: Path, wait_s: float, title: str) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_path`` (yields True), or yield False after ``wait_s`` seconds.

    The lock belongs to the open file: when its holder exits or is killed the kernel releases it, so a lock
    file left on disk never blocks anyone. The holder writes its pid into the file (for messages only).
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() >= deadline:
                yield False
                return
            if not said:
                said = True
                _say(
                    f"{_holder(lock_path)} is building the {title}; waiting for it (at most {wait_s:.0f} s, "
                    f"SSMKIT_KERNEL_WAIT) ..."
                )
            time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _torch_builder(ext: Extension, name: str, folder: Path) -> Path:
    """Compile with ``torch.utils.cpp_extension`` into ``folder`` (private to this build); the module file."""
    from torch.utils import cpp_extension

    includes = sorted({str(Path(h).parent) for h in ext.headers})
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in ext.sources],
        extra_cflags=list(ext.cflags),
        extra_ldflags=list(ext.ldflags),
        extra_include_paths=includes,
        build_directory=str(folder),
        verbose=False,
    )
    path = _find_module_file(folder, name)
    if path is None:
        raise RuntimeError(f"the build finished but wrote no {name}{_suffix()} in {folder}")
    return path


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[0][:200]


def _build(ext: Extension, key: str, folder: Path, failed: Path) -> Path:
    """Under the lock: compile into a temporary folder, then rename it into place. Returns the module file."""
    root = folder.parent
    for stale in root.glob(f"{folder.name}.tmp-*"):  # a killed build's (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{folder.name}.tmp-"))
    name = module_name(ext, key)
    _say(
        f"compiling the {ext.title} (C++, once per machine and source version; {ext.expected_build}) "
        f"into {folder} ..."
    )
    t0 = time.monotonic()
    try:
        built = (ext.builder or _torch_builder)(ext, name, tmp)
        final = folder / built.name
        if folder.exists():  # an incomplete folder (a module file never appeared in it)
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):
            from ssmkit.utils import atomic_write_text

            atomic_write_text(failed, f"{type(e).__name__}: {e}\n")
            _say(f"building the {ext.title} failed after {time.monotonic() - t0:.0f} s (log: {failed})")
        raise
    _say(f"built the {ext.title} in {time.monotonic() - t0:.0f} s")
    return final


class _Unavailable(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def _locate(ext: Extension) -> tuple[str, Path, Path, Path]:
    """(key, folder, lock, failure record); raises _Unavailable("disabled" | "compiler", reason)."""
    if _env_flag("SSMKIT_NO_CPU_EXT"):
        raise _Unavailable("disabled", "the C++ kernels are disabled by SSMKIT_NO_CPU_EXT=1")
    version = _compiler_version(compiler())
    if version is None and ext.builder is None:
        raise _Unavailable(
            "compiler",
            f"no C++ compiler found (looked for {compiler()!r}; install g++ or clang++, or set CXX)",
        )
    key = build_key(ext, version or "none")
    return (key, *_paths(ext, key))


def _load(ext: Extension, build: bool):
    key, folder, lock_path, failed = _locate(ext)
    name = module_name(ext, key)
    path = _find_module_file(folder, name)
    if path is not None:  # the common case: no lock, no compiler run
        try:
            return _import_file(name, path)
        except ImportError as e:  # a damaged build (the file is renamed into place complete)
            if not build:
                raise _Unavailable(
                    "failed",
                    f"importing {path} failed ({_first_line(e)}); run `ssmkit kernels build` or delete "
                    f"{folder} to rebuild it",
                ) from e
            with build_lock(lock_path, wait_limit(), ext.title) as held:
                if held:
                    shutil.rmtree(folder, ignore_errors=True)
    if failed.exists():
        if not build:
            raise _Unavailable(
                "failed",
                f"building the {ext.title} failed earlier (log: {failed}); delete that file or run "
                f"`ssmkit kernels build` to try again",
            )
        failed.unlink(missing_ok=True)
    wait_s = wait_limit()
    with build_lock(lock_path, wait_s, ext.title) as held:
        if not held:
            raise _Unavailable(
                "lock",
                f"timed out after {wait_s:.0f} s waiting for {_holder(lock_path)} to finish building the "
                f"{ext.title} (lock {lock_path}); let it finish or stop it, then run `ssmkit kernels build` "
                f"(SSMKIT_KERNEL_WAIT sets the wait)",
            )
        path = _find_module_file(folder, name)  # built by the process we waited for?
        if path is None:
            if failed.exists() and not build:
                raise _Unavailable("failed", f"building the {ext.title} failed (log: {failed})")
            try:
                path = _build(ext, key, folder, failed)
            except Exception as e:  # noqa: BLE001 - a failed compile becomes the reason
                raise _Unavailable(
                    "failed",
                    f"building the {ext.title} failed: {type(e).__name__}: {_first_line(e)} "
                    f"(full log: {failed})",
                ) from e
    return _import_file(name, path)


_loaded: dict[str, object] = {}
_reasons: dict[str, tuple[str, str]] = {}  # ext name -> (kind, reason), per process


def load(ext: Extension):
    """The extension's module, building it first if needed; None when it cannot be had (see :func:`reason`).

    Asked once per process and extension: the answer (module or reason) is cached; only
    ``SSMKIT_NO_CPU_EXT`` is looked at on every call.
    """
    if _env_flag("SSMKIT_NO_CPU_EXT"):  # asked on every call, so that setting it later takes effect
        _reasons[ext.name] = ("disabled", "the C++ kernels are disabled by SSMKIT_NO_CPU_EXT=1")
        return None
    if ext.name in _loaded:
        return _loaded[ext.name]
    if ext.name in _reasons:
        if _reasons[ext.name][0] != "disabled":
            return None
        del _reasons[ext.name]
    try:
        module = _load(ext, build=False)
    except _Unavailable as e:
        _reasons[ext.name] = (e.kind, str(e))
        return None
    except Exception as e:  # noqa: BLE001 - a broken build (e.g. an import error) falls back, said once
        why = f"loading the {ext.title} failed: {type(e).__name__}: {_first_line(e)}"
        _reasons[ext.name] = ("failed", why)
        return None
    _loaded[ext.name] = module
    return module


def reason(ext: Extension) -> str | None:
    """None when :func:`load` gives the module, else why not (one line). Loads or builds on first call."""
    load(ext)
    return _reasons.get(ext.name, (None, None))[1]


def build(ext: Extension):
    """Build now, retrying a recorded failure (``ssmkit kernels build``); RuntimeError with the reason."""
    _reasons.pop(ext.name, None)
    try:
        module = _load(ext, build=True)
    except _Unavailable as e:
        _reasons[ext.name] = (e.kind, str(e))
        raise RuntimeError(str(e)) from None
    _loaded[ext.name] = module
    return module


def status(ext: Extension) -> Status:
    """Whether ``ext`` is built for this machine, where, and under which key; builds nothing."""
    try:
        key, folder, _, failed = _locate(ext)
    except _Unavailable as e:
        return Status(ext.name, None, None, None, False, str(e))
    path = _find_module_file(folder, module_name(ext, key))
    why = None
    if path is None and failed.exists():
        why = f"the last build failed (log: {failed})"
    return Status(ext.name, key, folder, path, path is not None, why)


_warned: set[str] = set()


def warn_fallback(ext: Extension, fallback: str, stacklevel: int = 3, why: str | None = None) -> None:
    """One RuntimeWarning per process and cause: ``ext`` is unavailable (why), ``fallback`` runs instead.

    ``why`` defaults to the loader's reason for ``ext``. Causes shared by every extension (no compiler,
    disabled) are said once for all of them.
    """
    kind, known = _reasons.get(ext.name, ("other", None))
    if why is None:
        why = known
    if why is None:
        return
    if why != known:
        kind = "other"
    key = kind if kind in ("compiler", "disabled") else f"{ext.name}:{kind}"
    if key in _warned:
        return
    _warned.add(key)
    what = "the C++ kernels are" if kind in ("compiler", "disabled") else f"the {ext.title} is"
    warnings.warn(
        f"ssmkit: {what} unavailable ({why}); using {fallback} instead (slower, same results). "
        "`ssmkit kernels status` shows the state of the build.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def forget() -> None:
    """Drop this process's cached answers (tests)."""
    _loaded.clear()
    _reasons.clear()
    _warned.clear()
    _compiler_version.cache_clear()
