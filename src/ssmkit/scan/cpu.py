"""The ``cpu`` selective-scan backend: a fused C++ kernel, vectorised across channels, with a backward.

Reference: Gu & Dao (2023) §3.3 (the hardware-aware scan: the state lives only in registers, the
backward recomputes); mamba-ssm's CUDA kernel (``reference/mamba.md`` §1.4) for the chunk-boundary
checkpoints. The kernel is ``csrc/selective_scan_cpu.cpp`` (+ ``csrc/vec_math.h``), compiled at first
use with ``torch.utils.cpp_extension`` into ``~/.cache/ssmkit/torch_extensions/<key>`` and cached
(the key hashes the sources, the flags, the torch version and the CPU). Walkthrough:
``docs/fused-scan.md``. The slow twin is ``ssmkit.scan.reference.selective_scan_reference``.

Glossary (code -> paper): see ``ssmkit.scan``; in addition
    saved (b, K, d, n)   the state h at the start of each chunk of ``CHUNK`` steps (K = ⌈l / CHUNK⌉),
                         the only activation the backward keeps besides the inputs
    lanes                16 consecutive channels computed together in one SIMD vector

Forward, one pass over the inputs (never a (b, d, l, n) tensor):
    Δ = softplus(delta + delta_bias);  h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t;
    y_t = C_t · h_t + D u_t;  out_t = y_t · SiLU(z_t)
Backward, per chunk in reverse: recompute h and Ā from the saved boundary state, then
    G_t = Ā_{t+1} G_{t+1} + dy_t C_t   (G_l starts from the gradient of last_state)
and read every gradient off G_t, h_t, h_{t-1} (see docs/fused-scan.md).

Dtypes: float32, bfloat16 and float16 inputs (state and accumulation in float32; out in u's dtype; last_state
float32). float64 is refused with a ValueError (the kernel is single precision; use the ``reference``
or ``chunked`` backend for float64, e.g. for gradcheck).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch
from torch import Tensor

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("selective_scan_cpu.cpp",)
_HEADERS = ("vec_math.h",)
_CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17")
_LDFLAGS = ("-fopenmp",)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_ext = None  # the loaded module
_reason: str | None = None  # why it could not be loaded (cached)
_tried = False


def _cpu_id() -> str:
    """The CPU model and flags (``-march=native`` code is only valid on the CPU that built it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(lines[:2])
    except OSError:
        return platform.processor() or platform.machine()


def _build_key() -> str:
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update((_CSRC / name).read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(_cpu_id().encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ssmkit" / "torch_extensions"


def unavailable_reason() -> str | None:
    """Build (first call) or load the extension; None when it is usable, else a one-line reason.

    Never raises. ``SSMKIT_NO_CPU_EXT=1`` simulates a machine where the extension cannot be built.
    """
    global _ext, _reason, _tried
    if os.environ.get("SSMKIT_NO_CPU_EXT", "") not in ("", "0"):
        return "the fused CPU scan is disabled by SSMKIT_NO_CPU_EXT"
    if _tried:
        return _reason
    _tried = True
    try:
        from torch.utils import cpp_extension

        key = _build_key()
        build_dir = _cache_root() / key
        build_dir.mkdir(parents=True, exist_ok=True)
        _ext = cpp_extension.load(
            name=f"ssmkit_scan_cpu_{key}",
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            extra_include_paths=[str(_CSRC)],
            build_directory=str(build_dir),
            verbose=False,
        )
        _reason = None
    except Exception as e:  # noqa: BLE001 - any build/load failure becomes the reason string
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _reason = f"cannot build the fused CPU scan extension: {type(e).__name__}: {first}"[:300]
    return _reason


def extension():
    """The loaded extension module; raises RuntimeError with the reason when it is unavailable."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return _ext


def chunk_size() -> int:
    """Steps between saved states (the ``chunk`` of the tests: l = chunk ± 1 exercises the boundary)."""
    return int(extension().chunk)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _bc_in(M: Tensor) -> Tensor:
    """B or C -> the kernel's layout: (d, n) time-invariant, else (b, g, l, n) float32 contiguous."""
    if M.dim() == 2:  # (d, n)
        return _f32(M)
    if M.dim() == 3:  # (b, n, l) -> (b, 1, l, n)
        M = M[:, None]
    return M.to(torch.float32).transpose(2, 3).contiguous()  # (b, g, l, n)


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        args = (
            _f32(u),
            _f32(delta),
            _f32(A),
            _bc_in(B),
            _bc_in(C),
            _f32(D),
            _f32(z),
            _f32(delta_bias),
            _f32(initial_state),
        )
        out, last, saved = _ext.fwd(*args, bool(delta_softplus))  # (b, d, l), (b, d, n), (b, K, d, n)
        ctx.save_for_backward(*args, saved)
        ctx.delta_softplus = bool(delta_softplus)
        # the caller's dtype and rank of every input (gradients are returned in that dtype and layout)
        originals = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.orig = tuple(None if t is None else (t.dtype, t.dim()) for t in originals)
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, h0, saved = ctx.saved_tensors
        b, d, l = u.shape
        dout = torch.zeros_like(u) if dout is None else dout.to(torch.float32).contiguous()  # (b, d, l)
        dlast = (
            torch.zeros(b, d, A.shape[1]) if dlast is None else dlast.to(torch.float32).contiguous()
        )  # (b, d, n)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _ext.bwd(
            u, delta, A, B, C, D, z, delta_bias, h0, ctx.delta_softplus, saved, dout, dlast
        )
        (u_o, de_o, A_o, B_o, C_o, D_o, z_o, bias_o, h0_o) = ctx.orig

        def cast(g, meta):
            return None if meta is None else g.to(meta[0])

        def bc(g, meta):
            if meta[1] == 3:
                g = g[:, 0]  # (b, 1, n, l) -> (b, n, l)
            return g.to(meta[0])

        return (
            cast(du, u_o),
            cast(ddelta, de_o),
            cast(dA, A_o),
            bc(dB, B_o),
            bc(dC, C_o),
            cast(dD, D_o),
            cast(dz, z_o),
            cast(dbias, bias_o),
            cast(dh0, h0_o),
            None,
        )


def selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """Fused CPU selective scan. Arguments as ``ssmkit.selective_scan`` (already validated).

    Args:
        u, delta, z: (b, d, l) float32 or bfloat16.  A: (d, n).  B, C: (b, n, l) | (b, g, n, l) | (d, n).
        D, delta_bias: (d,).  initial_state: (b, d, n).  All on the CPU.
    Returns:
        out (b, d, l) in u's dtype, last_state (b, d, n) float32; both differentiable.
    Raises:
        ValueError for float64 or non-CPU inputs; RuntimeError when the extension is unavailable.
    """
    for name, t in (
        ("u", u),
        ("delta", delta),
        ("A", A),
        ("B", B),
        ("C", C),
        ("D", D),
        ("z", z),
        ("delta_bias", delta_bias),
        ("initial_state", initial_state),
    ):
        if t is None:
            continue
        if t.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got {name} on {t.device}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"backend 'cpu' computes in float32 and accepts float32, bfloat16 or float16; got {name} "
                f"of dtype {t.dtype} (use backend='reference' or 'chunked' for float64)"
            )
    if A.shape[1] > 256:
        raise ValueError(f"backend 'cpu' supports d_state n <= 256, got A of shape {tuple(A.shape)}")
    extension()  # builds on first use; RuntimeError with the reason if it cannot
    return _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)


def machine_limit(n: int = 16, reps: int = 20000) -> tuple[float, int]:
    """Run the kernel's inner loop on one in-cache tile: returns (seconds, state updates done).

    One state update = one (channel, step, state index) element of h_t = Ā h + Δ u B, y += C h —
    the same exp and FMAs as the real kernel, without any memory traffic.
    """
    import time

    ext = extension()
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    ext.limit(n, reps)
    dt = time.perf_counter() - t0
    updates = threads * reps * ext.chunk * n * ext.lanes
    return dt, updates


__all__ = ["selective_scan_cpu", "unavailable_reason", "chunk_size", "machine_limit"]
