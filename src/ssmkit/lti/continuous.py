"""Exact response of the continuous system to a piecewise-constant input (the ground truth for
measuring discretisation error).

Reference: the variation-of-constants formula x(t) = e^{A(t−t0)} x(t0) + ∫_{t0}^{t} e^{A(t−s)} B u(s) ds
(e.g. Åström & Murray, "Feedback Systems", §6.1). For u constant over [t0, t0 + Δ] the integral is
(∫_0^Δ e^{sA} ds) B u, and Van Loan's block trick gives both factors from one matrix exponential:

    exp([[A, B], [0, 0]] Δ) = [[e^{AΔ}, ∫_0^Δ e^{sA} ds B], [0, I]].

Glossary (code -> math):
    A (..., n, n) or (..., n)   A (dense or diagonal), B (..., n, p), C (..., q, n), D (..., q, p) or None
    u (..., l, p)               u_k, held constant on ((k)Δ, (k+1)Δ]
    y (..., l, q)               y(t_k) = C x(t_k) + D u_k at t_k = (k+1)Δ, from x(0) = state (or 0)

Always computed in float64 (complex128 for complex inputs), whatever the input precision, and returned
in that precision: it is a reference, not a fast path. It equals ZOH discretisation followed by the
recurrence — which is exactly why ZOH is exact for such inputs; the test suite checks it against an
independent ODE solver.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssmkit.lti._checks import broadcast_lead, check_tensor, shape, structure
from ssmkit.lti.expm import expm


def continuous_response(
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    u: Tensor,
    dt: float,
    state: Tensor | None = None,
    *,
    diagonal: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample y(t) of x' = Ax + Bu, y = Cx + Du at t_k = (k+1)Δ for a piecewise-constant u.

    Args:
        A: (..., n, n), or (..., n) diagonal (B then (..., n, p); the SISO layout is not accepted here).
        B: (..., n, p).   C: (..., q, n).   D: (..., q, p) or None.
        u: (..., l, p), u_k held on ((k)Δ, (k+1)Δ].
        dt: Δ > 0 (a float: one step for the whole batch).
        state: x(0) (..., n) or None (zeros).
    Returns:
        (y (..., l, q), x(lΔ) (..., n)) in float64 / complex128.
    """
    for name, t in (("A", A), ("B", B), ("C", C), ("u", u)):
        check_tensor(name, t, min_dim=1)
    if D is not None:
        check_tensor("D", D, min_dim=2)
    if state is not None:
        check_tensor("state", state, min_dim=1)
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise ValueError(f"dt must be a float > 0, got {dt!r}")
    kind = structure(A, B, diagonal)
    if kind == "diag_siso":
        raise ValueError(f"B must be (..., n, p) for continuous_response, got {shape(B)} with A {shape(A)}")
    is_complex = any(t is not None and t.is_complex() for t in (A, B, C, D, u, state))
    dtype = torch.complex128 if is_complex else torch.float64
    A, B, C, u = (t.to(dtype) for t in (A, B, C, u))
    if kind == "diag":
        A = torch.diag_embed(A)  # (..., n, n)
    n, p = A.shape[-1], B.shape[-1]
    if C.dim() < 2 or C.shape[-1] != n:
        raise ValueError(f"C must be (..., q, n) with n = {n}, got {shape(C)}")
    if u.dim() < 2 or u.shape[-1] != p:
        raise ValueError(f"u must be (..., l, p) with p = {p}, got {shape(u)}")
    lead = broadcast_lead(A=shape(A)[:-2], B=shape(B)[:-2], C=shape(C)[:-2], u=shape(u)[:-2])
    # Van Loan: one exponential of the (n+p) x (n+p) block matrix per system.
    M = _block(A, B) * dt  # (..., n+p, n+p)
    E = expm(M)  # (..., n+p, n+p)
    Phi, Gam = E[..., :n, :n], E[..., :n, n:]  # (..., n, n) e^{AΔ}, (..., n, p) ∫ e^{sA} ds B
    x = torch.zeros(*lead, n, 1, dtype=dtype, device=u.device)  # (..., n, 1)
    if state is not None:
        x = x + state.to(dtype)[..., None]
    xs = []
    for k in range(u.shape[-2]):
        x = Phi @ x + Gam @ u[..., k, :, None]  # (..., n, 1)
        xs.append(x[..., 0])
    X = torch.stack(xs, dim=-2) if xs else torch.zeros(*lead, 0, n, dtype=dtype)  # (..., l, n)
    y = (C[..., None, :, :] @ X[..., None])[..., 0]  # (..., l, q)
    if D is not None:
        if D.shape[-2:] != (C.shape[-2], p):
            raise ValueError(f"D must be (..., q, p) = (..., {C.shape[-2]}, {p}), got {shape(D)}")
        y = y + (D.to(dtype)[..., None, :, :] @ u[..., None])[..., 0]  # (..., l, q)
    return y, x[..., 0]


def _block(A: Tensor, B: Tensor) -> Tensor:
    """[[A, B], [0, 0]] (..., n+p, n+p), leading dims of A and B broadcast."""
    lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    n, p = A.shape[-1], B.shape[-1]
    top = torch.cat([A.expand(*lead, n, n), B.expand(*lead, n, p)], dim=-1)  # (..., n, n+p)
    bottom = torch.zeros(*lead, p, n + p, dtype=A.dtype, device=A.device)  # (..., p, n+p)
    return torch.cat([top, bottom], dim=-2)  # (..., n+p, n+p)
