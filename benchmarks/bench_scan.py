"""Selective-scan benchmark: ssmkit's backends against the CPU Mamba implementations people use today.

One layer-call of the Mamba-130m shape: b=1, d=1536, n=16, float32, softplus(Δ + bias), D skip and the
SiLU(z) gate, at l ∈ {512, 2048, 8192}. All implementations run side by side in one process with the
same thread count (2 by default), medians of ≥ 5 timed runs after a warm-up:

    ours (cpu)          ssmkit.selective_scan(..., backend="cpu")       the fused C++ kernel
    ours (chunked)      ssmkit.selective_scan(..., backend="chunked")   pure PyTorch
    transformers slow   transformers' ``mamba_selective_scan`` recurrent path (MambaMixer's slow path)
    mamba-ssm ref       mamba-ssm's ``selective_scan_ref`` semantics, reimplemented below
    mambapy pscan       mambapy's ``MambaBlock.selective_scan`` (its ``pscan``), reimplemented below

Forward+backward through the two sequential loops is quadratic in l under autograd (each step's slice
allocates a gradient the size of the whole sequence), so it is run only for l ≤ 512.

Peak memory: each (implementation, mode, l) runs once more in a fresh subprocess that resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``) after building its inputs and reports
VmHWM − VmRSS: the extra memory of that one call. The machine limit runs the fused kernel's inner
loop (the same vector exps and FMAs) on one in-cache tile and reports state updates per second.

    python benchmarks/bench_scan.py                     # l = 512 2048 8192, prints the table
    python benchmarks/bench_scan.py --lengths 2048 --impls "ours (cpu)" --no-memory   # a short check
    python benchmarks/bench_scan.py --write-docs        # also replace the section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmkit.bench.machine import cpu_model, median_time
from ssmkit.utils import atomic_write_text

D_MODEL_INNER, D_STATE = 1536, 16
SEQUENTIAL_BWD_MAX_L = 512
IMPLS = ("ours (cpu)", "ours (chunked)", "transformers slow", "mamba-ssm ref", "mambapy pscan")


# ---- the implementations (same arguments as ssmkit.selective_scan; B, C: (b, n, l)) -----------------
def ours_cpu(u, delta, A, B, C, D, z, bias):
    import ssmkit.scan as scan

    return scan.selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend="cpu")


def ours_chunked(u, delta, A, B, C, D, z, bias):
    import ssmkit.scan as scan

    return scan.selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend="chunked")


def transformers_slow(u, delta, A, B, C, D, z, bias):
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    return mamba_selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, use_mambapy=False)


def mamba_ssm_ref(u, delta, A, B, C, D, z, bias):
    """mamba-ssm's ``selective_scan_ref`` for real A and variable B, C (reference/mamba.md §1.3)."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    delta = F.softplus(delta + bias[..., None].float())  # (b, d, l)
    b, d, n = u.shape[0], A.shape[0], A.shape[1]
    x = A.new_zeros((b, d, n))  # (b, d, n)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # (b, d, l, n)
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)  # (b, d, l, n)
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]  # (b, d, n)
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))  # (b, d)
    y = torch.stack(ys, dim=2)  # (b, d, l)
    out = y + u * D[:, None]
    out = out * F.silu(z)
    return out.to(dtype_in)


def mambapy_pscan(u, delta, A, B, C, D, z, bias):
    """mambapy's ``MambaBlock.selective_scan`` in its (b, l, d) layout, then the gate."""
    from mambapy.pscan import pscan

    x = u.transpose(1, 2)  # (b, l, d)
    dt = F.softplus(delta + bias[:, None]).transpose(1, 2)  # (b, l, d)
    Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)  # (b, l, n)
    delta_a = torch.exp(dt.unsqueeze(-1) * A)  # (b, l, d, n)
    bx = dt.unsqueeze(-1) * Bt.unsqueeze(2) * x.unsqueeze(-1)  # (b, l, d, n)
    hs = pscan(delta_a, bx)  # (b, l, d, n)
    y = (hs @ Ct.unsqueeze(-1)).squeeze(3) + D * x  # (b, l, d)
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)  # (b, d, l)


FUNCS = dict(zip(IMPLS, (ours_cpu, ours_chunked, transformers_slow, mamba_ssm_ref, mambapy_pscan)))


def unavailable(name: str) -> str | None:
    """Why an implementation cannot run here (None when it can)."""
    try:
        if name == "ours (cpu)":
            from ssmkit.scan.cpu import unavailable_reason

            return unavailable_reason()
        if name == "ours (chunked)":
            import ssmkit.scan.chunked  # noqa: F401
        elif name == "transformers slow":
            from transformers.models.mamba.modeling_mamba import mamba_selective_scan  # noqa: F401
        elif name == "mambapy pscan":
            import mambapy.pscan  # noqa: F401
    except ImportError as e:
        return f"not installed: {e}"
    return None


def make_inputs(l: int, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, d, n = 1, D_MODEL_INNER, D_STATE
    x = [
        torch.randn(b, d, l, generator=g),  # u (b, d, l)
        torch.randn(b, d, l, generator=g) * 0.5 - 2.0,  # delta (b, d, l)
        -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),  # A (d, n): S4D-real init
        torch.randn(b, n, l, generator=g),  # B (b, n, l)
        torch.randn(b, n, l, generator=g),  # C (b, n, l)
        torch.ones(d),  # D (d,)
        torch.randn(b, d, l, generator=g),  # z (b, d, l)
        torch.rand(d, generator=g) * 0.1,  # delta_bias (d,)
    ]
    return [t.requires_grad_(grad) for t in x]


def run_once(name: str, x, backward: bool):
    out = FUNCS[name](*x)
    if backward:
        out.backward(torch.ones_like(out))
        for t in x:
            t.grad = None


def skip_reason(name: str, l: int, backward: bool, skip_fwdbwd_above: dict[str, int]) -> str | None:
    if backward and name in ("transformers slow", "mamba-ssm ref") and l > SEQUENTIAL_BWD_MAX_L:
        return f"skipped: quadratic under autograd above l={SEQUENTIAL_BWD_MAX_L}"
    if backward and name in skip_fwdbwd_above and l > skip_fwdbwd_above[name]:
        return f"skipped on request above l={skip_fwdbwd_above[name]} (--skip-fwdbwd-above)"
    return unavailable(name)


SLOW_CASE_S = 20.0  # a case whose warm-up run takes longer than this is timed by that one run


def time_case(name: str, l: int, backward: bool, repeats: int) -> tuple[float, int]:
    """Median seconds over `repeats` runs after a warm-up; returns (median, runs)."""
    x = make_inputs(l, backward)
    ctx = torch.enable_grad() if backward else torch.no_grad()
    with ctx:
        t0 = time.perf_counter()
        run_once(name, x, backward)  # warm-up (and the extension build, if first)
        first = time.perf_counter() - t0
        if first > SLOW_CASE_S:
            return first, 1
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_once(name, x, backward)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts), repeats


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, l: int, backward: bool, threads: int) -> None:
    """Subprocess body: extra peak RSS (MiB) of one call, printed as JSON."""
    torch.set_num_threads(threads)
    x = make_inputs(l, backward)
    ctx = torch.enable_grad() if backward else torch.no_grad()
    with ctx:
        run_once(name, make_inputs(min(l, 64), backward), backward)  # imports, extension load
        import gc

        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        run_once(name, x, backward)
        peak = _status_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - before) / 1024}))


def measure_memory(name: str, l: int, backward: bool, threads: int) -> float | None:
    cmd = [sys.executable, __file__, "--memory-child", name, str(l), str(int(backward)), str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        print(f"  memory run failed for {name} l={l}: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["extra_mib"]


def machine_limit(repeats: int) -> float:
    """Median G state-updates/s of the kernel's inner loop on in-cache data."""
    from ssmkit.scan.cpu import machine_limit as run

    run(D_STATE, 2000)
    rates = []
    for _ in range(repeats):
        dt, updates = run(D_STATE, 20000)
        rates.append(updates / dt / 1e9)
    return statistics.median(rates)


def interleaved_limit(l: int, threads: list[int], repeats: int) -> list[str]:
    """Ours (cpu) forward and the machine limit, alternated run by run so both see the same load."""
    from ssmkit.scan.cpu import machine_limit as limit_run

    x = make_inputs(l, False)
    lines = [
        f"Interleaved (each ours-forward run at l={l} followed by a machine-limit run, {repeats} pairs, "
        "medians; the fairest % on a shared machine):",
        "",
        "| threads | ours forward | ours G state-updates/s | machine limit G/s | % of limit |",
        "|---|---|---|---|---|",
    ]
    saved = torch.get_num_threads()
    for th in threads:
        torch.set_num_threads(th)
        ours, lim = [], []
        with torch.no_grad():
            run_once("ours (cpu)", x, False)
            for _ in range(repeats):
                t0 = time.perf_counter()
                run_once("ours (cpu)", x, False)
                ours.append(time.perf_counter() - t0)
                dt, updates = limit_run(D_STATE, 5000)
                lim.append(updates / dt / 1e9)
        t = statistics.median(ours)
        rate = D_MODEL_INNER * l * D_STATE / t / 1e9
        mlim = statistics.median(lim)
        lines.append(f"| {th} | {fmt_ms(t)} | {rate:.2f} | {mlim:.2f} | {100 * rate / mlim:.0f}% |")
    torch.set_num_threads(saved)
    return lines


def cpu_time_study(repeats: int) -> dict[str, float]:
    """Single-thread CPU-time medians (``time.process_time``, which other processes disturb far less than
    wall time): the fused scan forward and forward+backward, the chunked forward (all at l = 2048), the
    causal conv1d + SiLU forward+backward, and the decode ops of one 130m-shape mixer (selective_scan at
    l = 1 with a state, the conv with its history). Seconds; for A/B runs of two checkouts (PYTHONPATH)."""
    import ssmkit.scan as scan
    from ssmkit.layers.conv import causal_conv1d_silu

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = make_inputs(2048, grad=False)

    def med(fn, reps):
        return median_time(fn, reps, clock=time.process_time)

    def fwd(backend):
        with torch.no_grad():
            scan.selective_scan(*x, delta_softplus=True, backend=backend)

    leaves = [t.clone().requires_grad_() for t in x]

    def fwdbwd():
        scan.selective_scan(*leaves, delta_softplus=True, backend="cpu").sum().backward()

    d = D_MODEL_INNER
    cx = torch.randn(1, d, 2048, generator=g).requires_grad_()
    cw, cb = torch.randn(d, 4, generator=g).requires_grad_(), torch.randn(d, generator=g).requires_grad_()

    def conv():
        causal_conv1d_silu(cx, cw, cb).sum().backward()

    u1 = [t[..., :1].contiguous() if t.dim() == 3 else t for t in x]  # l = 1
    h, hist = torch.randn(1, d, D_STATE, generator=g), torch.randn(1, d, 3, generator=g)
    w1, b1 = cw.detach(), cb.detach()

    def decode_ops():
        with torch.no_grad():
            for _ in range(100):
                scan.selective_scan(*u1, delta_softplus=True, return_last_state=True, initial_state=h)
                causal_conv1d_silu(u1[0], w1, b1, hist)

    return {
        "scan_cpu_fwd_s": med(lambda: fwd("cpu"), 3 * repeats),
        "scan_cpu_fwdbwd_s": med(fwdbwd, repeats),
        "scan_chunked_fwd_s": med(lambda: fwd("chunked"), repeats),
        "conv_fwdbwd_s": med(conv, 2 * repeats),
        "decode_ops_per_token_s": med(decode_ops, 2 * repeats) / 100,
    }


def fmt_ms(t: float | None, runs: int = 0) -> str:
    if t is None:
        return "—"
    s = f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.1f} s"
    return s + (" (1 run)" if runs == 1 else "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="sequence lengths l")
    p.add_argument("--threads", type=int, default=2, help="torch threads (all implementations)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to run")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="also replace the '## Selective scan' section of docs/benchmarks.md with this run's table "
        "(default: print only)",
    )
    p.add_argument(
        "--skip-fwdbwd-above",
        nargs="+",
        default=[],
        metavar="IMPL=L",
        help='skip fwd+bwd of IMPL above length L, e.g. "ours (chunked)=2048" (for super-linear cases)',
    )
    p.add_argument(
        "--limit-only", action="store_true", help="only the interleaved ours-vs-machine-limit study (prints)"
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="only the single-thread CPU-time study of ssmkit's kernels (prints JSON; for A/B runs of two "
        "checkouts on a loaded machine, e.g. PYTHONPATH=<other checkout>/src)",
    )
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        name, l, bwd, threads = args.memory_child
        memory_child(name, int(l), bool(int(bwd)), int(threads))
        return
    skip_above = {}
    for item in args.skip_fwdbwd_above:
        impl, _, length = item.rpartition("=")
        if impl not in IMPLS or not length.isdigit():
            raise SystemExit(f"--skip-fwdbwd-above: expected IMPL=L with IMPL in {IMPLS}, got {item!r}")
        skip_above[impl] = int(length)
    if args.cpu_time:
        print(json.dumps(cpu_time_study(args.repeats)))
        return
    if args.limit_only:
        print("\n".join(interleaved_limit(2048, sorted({1, args.threads}), max(args.repeats, 7))))
        return
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    command = "python benchmarks/bench_scan.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = []  # (l, impl, fwd, fwdbwd, mem_fwd, mem_bwd, note)
    for l in args.lengths:
        for name in args.impls:
            res = {"l": l, "impl": name}
            for mode, bwd in (("fwd", False), ("fwdbwd", True)):
                why = skip_reason(name, l, bwd, skip_above)
                res[mode], res[mode + "_runs"] = (None, 0) if why else time_case(name, l, bwd, args.repeats)
                res[mode + "_mem"] = (
                    None if (why or args.no_memory) else measure_memory(name, l, bwd, args.threads)
                )
                res[mode + "_why"] = why
                print(
                    f"l={l:5d} {name:18s} {mode:7s} {fmt_ms(res[mode]):>10s}"
                    + (f"  peak +{res[mode + '_mem']:.0f} MiB" if res[mode + "_mem"] is not None else "")
                    + (f"  ({why})" if why else ""),
                    flush=True,
                )
            rows.append(res)
    limit = machine_limit(args.repeats) if unavailable("ours (cpu)") is None else None
    load = (load_start, os.getloadavg()[0])
    table = render(rows, limit, args, command, load)
    if limit is not None:
        table += "\n\n" + "\n".join(interleaved_limit(2048, sorted({1, args.threads}), max(args.repeats, 7)))
    print()
    print(table)
    if args.write_docs:
        write_section(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", table)


def render(rows, limit, args, command, load) -> str:
    n_upd = lambda l: D_MODEL_INNER * l * D_STATE  # noqa: E731
    ours = {(r["l"], m): r[m] for r in rows if r["impl"] == "ours (cpu)" for m in ("fwd", "fwdbwd")}

    def ratio(r, m):
        o = ours.get((r["l"], m))
        return "—" if r[m] is None or not o else f"{r[m] / o:.1f}×"

    def mem(v):
        return "—" if v is None else f"{v:.0f}"

    lines = [
        f"Command: `{command.strip()}`  ",
        f"b=1, d={D_MODEL_INNER}, n={D_STATE}, float32, softplus(Δ+bias), D, SiLU(z) gate; "
        f"{args.threads} threads, median of {args.repeats} runs after a warm-up; torch {torch.__version__}. "
        "“× ours” = that row's time / ours (cpu) at the same l (higher = ours faster). Peak = extra RSS of "
        f"one call in a fresh process (MiB). A case whose warm-up took > {SLOW_CASE_S:.0f} s is timed by "
        "that one run (marked). "
        f"CPU model: {cpu_model()}. "
        f"Machine: {os.cpu_count()} CPUs shared with other work; 1-min load average {load[0]:.1f} at the "
        f"start,"
        f" {load[1]:.1f} at the end — absolute times are noisy, compare ratios within the run.",
        "",
        "| l | implementation | forward | × ours | fwd+bwd | × ours | peak fwd | peak fwd+bwd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        why = r["fwdbwd_why"] or ""
        fb = (
            fmt_ms(r["fwdbwd"], r["fwdbwd_runs"])
            if r["fwdbwd"] is not None
            else "skipped (quadratic)"
            if "quadratic" in why
            else "skipped (on request)"
            if "request" in why
            else "—"
        )
        lines.append(
            f"| {r['l']} | {r['impl']} | {fmt_ms(r['fwd'], r['fwd_runs'])} | {ratio(r, 'fwd')} | {fb} "
            f"| {ratio(r, 'fwdbwd')} | {mem(r['fwd_mem'])} | {mem(r['fwdbwd_mem'])} |"
        )
    missing = sorted({f"{r['impl']}: {r['fwd_why']}" for r in rows if r["fwd_why"]})
    if missing:
        lines += ["", "Not run: " + "; ".join(missing) + "."]
    if limit is not None:
        lines += [
            "",
            f"Machine limit (the kernel's inner loop — same vector exps and FMAs — on one in-cache "
            f"tile, {args.threads} threads): **{limit:.2f} G state-updates/s**.",
            "",
        ]
        lines += ["| l | ours forward, G state-updates/s | % of machine limit |", "|---|---|---|"]
        for (l, m), t in sorted(ours.items()):
            if m == "fwd" and t:
                rate = n_upd(l) / t / 1e9
                lines.append(f"| {l} | {rate:.2f} | {100 * rate / limit:.0f}% |")
    lines += ["", *targets(rows, limit)]
    return "\n".join(lines)


def targets(rows, limit) -> list[str]:
    """The performance targets, evaluated on this run's numbers (measured, not asserted)."""
    by = {(r["l"], r["impl"]): r for r in rows}
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    out = ["Targets, from this run:", ""]

    def speedup(l, impl, m):
        o, r = by.get((l, "ours (cpu)")), by.get((l, impl))
        return None if not o or not r or not o[m] or not r[m] else r[m] / o[m]

    for impl in ("transformers slow", "mambapy pscan"):
        for m, goal in (("fwd", 30), ("fwdbwd", 20)):
            s = speedup(2048, impl, m)
            if s is None and m == "fwdbwd" and impl == "transformers slow":
                s512 = speedup(512, impl, m)
                if s512 is not None:
                    out.append(
                        f"- fwd+bwd ≥ {goal}× {impl}: at l=512 {s512:.0f}× "
                        f"({met(s512 >= goal)}; above 512 it is quadratic, not run)"
                    )
                continue
            if s is not None:
                label = "forward" if m == "fwd" else "fwd+bwd"
                out.append(f"- {label} ≥ {goal}× {impl} at l=2048: {s:.0f}× — {met(s >= goal)}")
    o = by.get((2048, "ours (cpu)"))
    if limit and o and o["fwd"]:
        pct = 100 * D_MODEL_INNER * 2048 * D_STATE / o["fwd"] / 1e9 / limit
        out.append(f"- ≥ 50% of the machine limit at l=2048: {pct:.0f}% — {met(pct >= 50)}")
    o8, m8 = by.get((8192, "ours (cpu)")), by.get((8192, "mambapy pscan"))
    if o8 and m8 and o8["fwdbwd_mem"] is not None and m8["fwdbwd_mem"]:
        frac = o8["fwdbwd_mem"] / m8["fwdbwd_mem"]
        out.append(
            f"- peak fwd+bwd memory at l=8192 ≤ 1/8 of mambapy's: {o8['fwdbwd_mem']:.0f} vs "
            f"{m8['fwdbwd_mem']:.0f} MiB (1/{1 / max(frac, 1e-9):.0f}) — {met(frac <= 1 / 8)}"
        )
    ch = by.get((2048, "ours (chunked)"))
    tr = by.get((2048, "transformers slow"))
    if ch and tr and ch["fwd"] and tr["fwd"]:
        s = tr["fwd"] / ch["fwd"]
        out.append(f"- chunked forward ≥ 3× transformers slow at l=2048: {s:.1f}× — {met(s >= 3)}")
    return out


def write_section(path: Path, table: str) -> None:
    """Replace (or append) the ``## Selective scan`` section of docs/benchmarks.md, atomically."""
    head = "## Selective scan"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured results; each section says how.\n"
    body = f"{head}\n\n{table}\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + body + ("\n" + text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    atomic_write_text(path, text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
