"""`ssmkit kernels`: build the C++ kernels ahead of time, or show where they stand on this machine."""

import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "kernels",
        help="build the fused C++ kernels ahead of time / show their status",
        description=(
            "ssmkit's fused C++ kernels (the selective scan, the causal conv1d, the decode step) are "
            "compiled once per machine and source version into <cache>/kernels (cache: SSMKIT_CACHE_DIR, "
            "default ~/.cache/ssmkit). `build` compiles them now (a minute or two each), `status` says for "
            "each whether it is built, where, its cache key and the CPU's ISA flags the build is for. "
            "Environment: SSMKIT_KERNEL_WAIT (seconds to wait for another process's build, default 900), "
            "SSMKIT_NO_CPU_EXT=1 (never use the C++ kernels), CXX (the compiler)."
        ),
    )
    ksub = p.add_subparsers(dest="kernels_command", metavar="ACTION", required=True)
    b = ksub.add_parser("build", help="compile every kernel not yet built for this machine")
    b.set_defaults(func=_run_build)
    s = ksub.add_parser("status", help="built or not, path, cache key and ISA of every kernel")
    s.set_defaults(func=_run_status)


def extensions() -> tuple:
    """Every C++ extension of ssmkit: the scan and conv kernels, and the engine's fused decode step."""
    from ssmkit import kernels
    from ssmkit.engine.decode import DECODE

    return (*kernels.EXTENSIONS, DECODE)


def _run_build(args) -> int:
    from ssmkit import kernels

    failed = 0
    for ext in extensions():
        try:
            kernels.build(ext)
        except RuntimeError as e:
            failed += 1
            print(f"error: {ext.name}: {e}", file=sys.stderr)
            continue
        st = kernels.status(ext)
        print(f"{ext.name}: built  {st.module_file}")
    return 1 if failed else 0


def _run_status(args) -> int:
    from ssmkit import kernels

    print(f"cache: {kernels.kernels_dir()}")
    isa = kernels.isa_flags()
    print(f"ISA:   {isa if len(isa) <= 200 else isa[:197] + '...'}")
    for ext in extensions():
        st = kernels.status(ext)
        state = "built" if st.built else "not built"
        where = st.module_file if st.built else st.folder
        line = f"{ext.name}: {state}  key {st.key or '-'}  {where or ''}".rstrip()
        if st.reason:
            line += f"  ({st.reason})"
        print(line)
    return 0
