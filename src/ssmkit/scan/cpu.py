"""The ``cpu`` selective-scan backend: a fused C++ kernel, vectorised across channels, with a backward.

Reference: Gu & Dao (2023) §3.3 (the hardware-aware scan: the state lives only in registers, the
backward recomputes); mamba-ssm's CUDA kernel (``csrc/selective_scan``) for the chunk-boundary
checkpoints. The kernel is ``csrc/selective_scan_cpu.cpp`` (+ ``csrc/vec_math.h``), built at first
use by ``ssmkit.kernels`` (content-keyed cache, lock-free loads, a build lock that cannot go stale; ``ssmkit
kernels build`` builds ahead of time). Walkthrough:
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

Non-finite values and empty sizes follow the reference: NaN and ±inf propagate through the forward and the
backward as in ``selective_scan_reference`` (the kernel's exp gives exp(−inf) = 0, exp(+inf) = +inf and keeps
NaN; the D term is added only when D is given). A call with b, d, n or l = 0 is answered by the reference
(an empty or state-only result, no kernel launch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssmkit import kernels
from ssmkit.scan.reference import selective_scan_reference

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_ext = None  # the loaded module


def unavailable_reason() -> str | None:
    """Load (or, the first time on this machine, build) the extension; None when usable, else why not.

    Never raises. The build, its cache and its lock are ``ssmkit.kernels``' (``SSMKIT_NO_CPU_EXT=1``
    simulates a machine where the extension cannot be built).
    """
    global _ext
    _ext = kernels.load(kernels.SCAN)  # the module, cached by the loader (a dict lookup)
    return None if _ext is not None else kernels.reason(kernels.SCAN)


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
    if u.numel() == 0 or A.numel() == 0:  # b, d, l or n = 0: the reference's answer, no kernel launch
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
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
