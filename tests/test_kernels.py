"""The C++ extension loader (``ssmkit.kernels``): content cache key, lock-free loads, a build lock that
cannot go stale (real second processes, killed with SIGKILL), the bounded wait and its one warning, and
the ``ssmkit kernels`` command.

Builds are faked (a builder that writes a small Python module, optionally after sleeping) so that the
lock and kill tests take seconds; the real kernels are built once per session by ``conftest.py`` and
exercised by the lock-free-load and CLI tests.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest

from ssmkit import kernels
from ssmkit.cli import kernels as kernels_cli
from ssmkit.kernels import loader

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Some CPU @ 2.10GHz
cpu MHz\t\t: {mhz}
flags\t\t: fpu sse2 avx2 avx512f fma
"""

# A child process: a fake extension whose build sleeps SLEEP seconds after touching READY.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ssmkit.kernels import loader

    src, ready, sleep = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def builder(ext, name, folder):
        ready.write_text("building")
        time.sleep(sleep)
        path = folder / f"{name}.py"
        path.write_text("VALUE = 'from child'\\n")
        return path

    ext = loader.Extension(name=sys.argv[4], title="test kernel", sources=(src,), builder=builder)
    module = loader.load(ext)
    print("loaded" if module is not None else loader.reason(ext), flush=True)
    """
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty kernel cache and a bounded wait of 30 s; the loader's per-process answers reset."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SSMKIT_CACHE_DIR", str(root))
    monkeypatch.setenv("SSMKIT_KERNEL_WAIT", "30")
    monkeypatch.delenv("SSMKIT_NO_CPU_EXT", raising=False)
    loader.forget()
    yield root
    loader.forget()


def _fake_ext(tmp_path: Path, calls: list | None = None, sleep: float = 0.0) -> loader.Extension:
    """A fake extension with a unique name (so no module is shared between tests through sys.modules)."""
    name = "t" + uuid.uuid4().hex[:8]
    src = tmp_path / f"{name}.cpp"
    src.write_text(f"// {name}\n")

    def builder(ext, module_name, folder):
        if calls is not None:
            calls.append(module_name)
        time.sleep(sleep)
        path = folder / f"{module_name}.py"
        path.write_text("VALUE = 42\n")
        return path

    return loader.Extension(name=name, title="test kernel", sources=(src,), builder=builder)


def _child(tmp_path, ext: loader.Extension, sleep: float, env_extra=None) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"ready-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ext.sources[0]), str(ready), str(sleep), ext.name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never started its build"
        time.sleep(0.02)
    return proc, ready


# ---- the cache key ------------------------------------------------------------------------------------


def test_isa_flags_ignore_the_clock():
    slow, fast = CPUINFO.format(mhz="800.000"), CPUINFO.format(mhz="3900.123")
    assert loader.isa_flags(slow) == loader.isa_flags(fast) == "avx2 avx512f fma fpu sse2"
    assert loader.isa_flags(CPUINFO.format(mhz="1").replace(" avx512f", "")) != loader.isa_flags(slow)


def test_key_is_content_not_location_and_changes_with_every_input(tmp_path):
    a, b = tmp_path / "checkout_a", tmp_path / "checkout_b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "k.cpp").write_text("int f() { return 1; }\n")
        (folder / "k.h").write_text("#pragma once\n")

    def ext(folder, **kw):
        return loader.Extension(
            name="k", title="t", sources=(folder / "k.cpp",), headers=(folder / "k.h",), **kw
        )

    key = loader.build_key(ext(a), "g++ 12", "avx2")
    assert loader.build_key(ext(b), "g++ 12", "avx2") == key  # two checkouts share one build
    assert loader.build_key(ext(a, cflags=("-O2",)), "g++ 12", "avx2") != key
    assert loader.build_key(ext(a), "g++ 13", "avx2") != key
    assert loader.build_key(ext(a), "g++ 12", "avx2 avx512f") != key
    (b / "k.cpp").write_text("int f() { return 2; }\n")
    assert loader.build_key(ext(b), "g++ 12", "avx2") != key
    (b / "k.cpp").write_text("int f() { return 1; }\n")
    (b / "k.h").write_text("#pragma once // changed\n")
    assert loader.build_key(ext(b), "g++ 12", "avx2") != key


def test_real_kernels_key_covers_their_sources():
    for ext in kernels.EXTENSIONS:
        assert all(p.is_file() for p in ext.sources + ext.headers)
        st = kernels.status(ext)
        if st.key is not None:
            assert st.folder.name == f"{ext.name}-{st.key}"
            assert str(Path(ext.sources[0]).parent) not in str(st.folder)


# ---- building and loading -----------------------------------------------------------------------------


def test_first_load_builds_once_and_says_so(cache, tmp_path, capfd):
    calls = []
    ext = _fake_ext(tmp_path, calls)
    module = loader.load(ext)
    assert module is not None and module.VALUE == 42
    err = capfd.readouterr().err
    assert err.count("compiling the test kernel") == 1 and "built the test kernel in" in err
    loader.forget()
    assert loader.load(ext).VALUE == 42  # a later process: the build is loaded, not rebuilt
    assert calls == [loader.module_name(ext, loader.status(ext).key)]
    assert capfd.readouterr().err == ""
    assert loader.status(ext).built


def test_existing_build_loads_without_the_lock(cache, tmp_path):
    """A build that exists is imported even while another process holds the build lock forever."""
    ext = _fake_ext(tmp_path)
    assert loader.load(ext) is not None
    st = loader.status(ext)
    lock = st.folder.parent / f"{st.folder.name}.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(120)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        loader.forget()
        os.environ["SSMKIT_KERNEL_WAIT"] = "0"
        t0 = time.monotonic()
        assert loader.load(ext).VALUE == 42
        assert time.monotonic() - t0 < 5.0  # no wait at all (the holder never lets go)
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_file_made_by_hand_does_not_delay(cache, tmp_path):
    ext = _fake_ext(tmp_path)
    st = loader.status(ext)
    lock = st.folder.parent / f"{st.folder.name}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("999999\n")  # a lock file whose "holder" is long gone (or never existed)
    t0 = time.monotonic()
    assert loader.load(ext).VALUE == 42
    assert time.monotonic() - t0 < 10.0


def test_builder_killed_mid_build_releases_the_lock(cache, tmp_path):
    """SIGKILL a real second process while it holds the lock inside its build: the next load goes at once."""
    calls = []
    ext = _fake_ext(tmp_path, calls)
    proc, _ = _child(tmp_path, ext, sleep=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = loader.status(ext)
    assert list(st.folder.parent.glob(f"{st.folder.name}.tmp-*")), "the killed build left its temp folder"
    t0 = time.monotonic()
    module = loader.load(ext)  # SSMKIT_KERNEL_WAIT=30, but nothing may wait
    assert time.monotonic() - t0 < 10.0
    assert module is not None and module.VALUE == 42 and len(calls) == 1
    assert not list(st.folder.parent.glob(f"{st.folder.name}.tmp-*")), "the stale temp folder stays"


def test_busy_lock_waits_at_most_the_bound_then_falls_back_with_one_warning(
    cache, tmp_path, monkeypatch, capfd
):
    ext = _fake_ext(tmp_path)
    proc, _ = _child(tmp_path, ext, sleep=120)
    try:
        monkeypatch.setenv("SSMKIT_KERNEL_WAIT", "1")
        t0 = time.monotonic()
        assert loader.load(ext) is None
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 10.0, waited
        why = loader.reason(ext)
        assert "timed out after 1 s" in why and f"pid {proc.pid}" in why and "ssmkit kernels build" in why
        assert f"pid {proc.pid} is building the test kernel" in capfd.readouterr().err
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert loader.load(ext) is None  # the answer is kept: no second wait
                loader.warn_fallback(ext, "the pure-PyTorch path")
        assert len(caught) == 1 and "timed out" in str(caught[0].message)
        assert issubclass(caught[0].category, RuntimeWarning)
    finally:
        proc.kill()
        proc.wait()


def test_waiter_gets_the_build_of_the_process_it_waited_for(cache, tmp_path):
    calls = []
    ext = _fake_ext(tmp_path, calls)
    proc, _ = _child(tmp_path, ext, sleep=1.5)
    module = loader.load(ext)
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == "loaded"
    assert module.VALUE == "from child" and calls == []


def test_failed_build_is_recorded_and_not_retried_until_asked(cache, tmp_path):
    src = tmp_path / "bad.cpp"
    src.write_text("// bad\n")
    calls = []

    def builder(ext, name, folder):
        calls.append(name)
        raise RuntimeError("error: expected ';' before '}' token")

    ext = loader.Extension(
        name="bad" + uuid.uuid4().hex[:6], title="test kernel", sources=(src,), builder=builder
    )
    assert loader.load(ext) is None
    assert "expected ';'" in loader.reason(ext) and "full log" in loader.reason(ext)
    loader.forget()
    assert loader.load(ext) is None and len(calls) == 1  # recorded: no second compile
    assert "delete that file or run `ssmkit kernels build`" in loader.reason(ext)
    with pytest.raises(RuntimeError, match="expected ';'"):
        loader.build(ext)  # asked explicitly: tried again
    assert len(calls) == 2


def test_damaged_build_falls_back_with_how_to_fix_and_build_replaces_it(cache, tmp_path):
    calls = []
    ext = _fake_ext(tmp_path, calls)
    assert loader.load(ext) is not None
    st = loader.status(ext)
    st.module_file.write_text("raise ImportError('truncated file')\n")
    sys.modules.pop(loader.module_name(ext, st.key), None)
    loader.forget()
    assert loader.load(ext) is None
    assert "truncated file" in loader.reason(ext) and "ssmkit kernels build" in loader.reason(ext)
    sys.modules.pop(loader.module_name(ext, st.key), None)
    assert loader.build(ext).VALUE == 42 and len(calls) == 2


def test_missing_compiler_is_one_warning_for_every_kernel(cache, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ext in kernels.EXTENSIONS:
            assert loader.load(ext) is None
            assert "no C++ compiler found" in loader.reason(ext) and "/nonexistent/c++" in loader.reason(ext)
            loader.warn_fallback(ext, "pure PyTorch")
            loader.warn_fallback(ext, "pure PyTorch")
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler found" in str(caught[0].message)


def test_missing_compiler_is_one_warning_end_to_end(cache, monkeypatch):
    """selective_scan(auto) and the Mamba conv both fall back, and the user reads about it once."""
    import torch

    import ssmkit.scan as scan
    from ssmkit.layers.conv import causal_conv1d_silu

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.delenv("SSMKIT_SCAN_BACKEND", raising=False)
    scan._cpu_unavailable_reason.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                u = torch.randn(1, 3, 5)
                scan.selective_scan(
                    u, torch.rand(1, 3, 5), -torch.rand(3, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5)
                )
                causal_conv1d_silu(u, torch.randn(3, 4))
        ours = [str(w.message) for w in caught if "ssmkit" in str(w.message)]
        assert len(ours) == 1, ours
        assert "no C++ compiler found" in ours[0] and "/nonexistent/c++" in ours[0]
    finally:
        scan._cpu_unavailable_reason.cache_clear()


def test_bad_wait_value_is_one_line_error(monkeypatch):
    monkeypatch.setenv("SSMKIT_KERNEL_WAIT", "soon")
    with pytest.raises(ValueError, match="SSMKIT_KERNEL_WAIT must be a number of seconds >= 0, got 'soon'"):
        loader.wait_limit()


def cli_main(argv: list[str]) -> int:
    """``ssmkit kernels ...`` through its own parser (the top-level one imports every command)."""
    parser = argparse.ArgumentParser(prog="ssmkit")
    kernels_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


# ---- the real kernels (built once by conftest.py) -----------------------------------------------------

SCAN_CHILD = textwrap.dedent(
    """
    import torch
    from ssmkit.scan import selective_scan
    u = torch.randn(1, 16, 8)
    out = selective_scan(u, torch.rand(1, 16, 8), -torch.rand(16, 4), torch.randn(1, 4, 8),
                         torch.randn(1, 4, 8), backend="cpu")
    print("ok", tuple(out.shape), flush=True)
    """
)


def _real_scan_built() -> bool:
    return os.environ.get("SSMKIT_NO_CPU_EXT", "") in ("", "0") and kernels.status(kernels.SCAN).built


@pytest.mark.skipif(not _real_scan_built(), reason="needs the fused scan kernel built (no C++ compiler here)")
def test_real_kernel_loads_while_its_lock_is_held_and_after_a_kill_mid_load():
    st = kernels.status(kernels.SCAN)
    lock = st.folder.parent / f"{st.folder.name}.lock"
    env = {**os.environ, "SSMKIT_KERNEL_WAIT": "0"}
    # a process killed at a random moment of its load leaves nothing behind
    victim = subprocess.Popen([sys.executable, "-c", SCAN_CHILD], env=env, stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with open(lock, "a") as fh:
        import fcntl

        fcntl.flock(fh, fcntl.LOCK_EX)  # held by this process for the whole child run
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", SCAN_CHILD], env=env, capture_output=True, text=True, timeout=120
        )
        elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok (1, 16, 8)"
    assert "waiting" not in done.stderr and "compiling" not in done.stderr
    assert elapsed < 60


def test_cli_kernels_status_and_build(capsys):
    assert cli_main(["kernels", "status"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {kernels.kernels_dir()}" in out and "ISA:" in out
    for ext in kernels_cli.extensions():
        st = kernels.status(ext)
        line = next(ln for ln in out.splitlines() if ln.startswith(f"{ext.name}: "))
        assert ("built" if st.built else "not built") in line
        if st.key:
            assert st.key in line
    if _real_scan_built() and all(kernels.status(e).built for e in kernels_cli.extensions()):
        t0 = time.monotonic()
        assert cli_main(["kernels", "build"]) == 0  # already built: loads, compiles nothing
        assert time.monotonic() - t0 < 30
        out = capsys.readouterr().out
        assert out.count(": built  ") == len(kernels_cli.extensions())


def test_cli_kernels_build_in_an_empty_cache_without_compiler_fails_in_one_line(cache, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cli_main(["kernels", "build"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(kernels_cli.extensions())
    assert all(ln.startswith("error: ") and "no C++ compiler found" in ln for ln in err)
