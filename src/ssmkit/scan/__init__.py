"""The selective scan (S6) of Mamba: one public function, several backends.

Reference: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), §3.2,
Algorithm 2; the argument names and semantics are those of ``mamba_ssm.selective_scan_fn``.

Glossary (code -> paper):
    u (b, d, l)        x, the input sequence of each of the d channels
    delta (b, d, l)    Δ before the optional ``softplus(Δ + delta_bias)``
    A (d, n)           A (diagonal per channel; real, negative for stability)
    B, C               B, C: input-dependent (b, n, l), grouped (b, g, n, l) or time-invariant (d, n)
    D (d,)             the skip connection D
    z (b, d, l)        the gate branch; the output is multiplied by SiLU(z)
    h (b, d, n)        the hidden state

Recurrence (ZOH for A, Euler for B — Mamba's simplification, said out loud):
    Ā_t = exp(Δ_t A),   h_t = Ā_t ⊙ h_{t-1} + Δ_t B_t u_t,   y_t = C_t · h_t + D u_t,   out = y ⊙ SiLU(z)

Extensions beyond mamba-ssm: ``initial_state`` (b, d, n) to start from, and a ``last_state`` that
carries gradient (so chunked training and state passing are differentiable).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

BACKENDS = ("auto", "reference", "chunked", "cpu")


def _check_shape(name: str, t: Tensor | None, expected: tuple, hint: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {hint} = {tuple(expected)}, got {tuple(t.shape)}")


def validate(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """Raise ValueError naming the argument, the expected and the received shape/dtype."""
    if not isinstance(u, Tensor) or u.dim() != 3:
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"u must be a 3-d tensor (b, d, l), got {shape}")
    b, d, l = u.shape
    if not u.is_floating_point():
        raise ValueError(f"u must be a floating-point tensor, got dtype {u.dtype}")
    _check_shape("delta", delta, (b, d, l), "(b, d, l)")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape (d, n) with d = {d}, got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("A must be real: complex selective scans are not supported")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            _check_shape(name, M, (d, n), "(d, n) [time-invariant]")
        elif M.dim() == 3:
            _check_shape(name, M, (b, n, l), "(b, n, l)")
        elif M.dim() == 4:
            if M.shape[0] != b or M.shape[2] != n or M.shape[3] != l or d % M.shape[1] != 0:
                raise ValueError(
                    f"{name} must have shape (b, g, n, l) = ({b}, g, {n}, {l}) with g dividing d = {d}, "
                    f"got {tuple(M.shape)}"
                )
        else:
            raise ValueError(f"{name} must be (d, n), (b, n, l) or (b, g, n, l), got {tuple(M.shape)}")
    _check_shape("D", D, (d,), "(d,)")
    _check_shape("z", z, (b, d, l), "(b, d, l)")
    _check_shape("delta_bias", delta_bias, (d,), "(d,)")
    _check_shape("initial_state", initial_state, (b, d, n), "(b, d, n)")


def _resolve_backend(backend: str, u: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("SSMKIT_SCAN_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"SSMKIT_SCAN_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "reference"  # replaced by the fast-backend choice once those backends exist
    return backend


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    backend: str = "auto",
):
    """Selective scan, mamba-ssm's ``selective_scan_fn`` semantics plus ``initial_state``.

    Args:
        u: (b, d, l) input.  delta: (b, d, l) Δ (before bias/softplus).  A: (d, n) real.
        B, C: (b, n, l) | (b, g, n, l) grouped | (d, n) time-invariant.
        D: (d,) skip.  z: (b, d, l) gate.  delta_bias: (d,) added to Δ before softplus.
        delta_softplus: apply softplus to Δ + delta_bias.
        return_last_state: also return the final state h_l (b, d, n), differentiable.
        initial_state: (b, d, n) h_0 (default zeros).
        backend: "auto" | "reference" | "chunked" | "cpu"; env ``SSMKIT_SCAN_BACKEND`` overrides "auto".
    Returns:
        out (b, d, l) in u's dtype, or (out, last_state (b, d, n) float32/float64).
    """
    validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    name = _resolve_backend(backend, u)
    if name == "reference":
        from ssmkit.scan.reference import selective_scan_reference as fn
    elif name == "chunked":
        from ssmkit.scan.chunked import selective_scan_chunked as fn
    else:
        from ssmkit.scan.cpu import selective_scan_cpu as fn
    out, last = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (out, last) if return_last_state else out
