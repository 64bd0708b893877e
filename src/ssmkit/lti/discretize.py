"""Discretisation: from the continuous system x' = A x + B u to the recurrence x_k = Ā x_{k-1} + B̄ u_k.

References:
    Gu, Goel, Ré, "Efficiently Modeling Long Sequences with Structured State Spaces" (ICLR 2022), §2.3
        (bilinear); Gu, Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal State
        Space Models" (S4D, 2022), §3 (ZOH); Zhang, Chong, "On the generalized bilinear transformation"
        (GBT); ``scipy.signal.cont2discrete`` (same formulas for Ā, B̄).

Glossary (code -> paper):
    A, B        continuous A (..., n, n) dense or (..., n) diagonal; B (..., n, p), or (..., n) (p = 1)
    dt          Δ, the step; a scalar or a tensor broadcasting over the leading dims (one Δ per channel)
    Ab, Bb      Ā, B̄
    alpha       α of the generalised bilinear transform

Formulas (I the identity, α ∈ [0, 1]):
    gbt(α):          Ā = (I − αΔA)^{-1} (I + (1−α)ΔA),    B̄ = (I − αΔA)^{-1} ΔB
    euler:           α = 0:  Ā = I + ΔA,  B̄ = ΔB          (the lecture's forward-Euler derivation)
    backward_euler:  α = 1:  Ā = (I − ΔA)^{-1},  B̄ = (I − ΔA)^{-1} ΔB
    bilinear:        α = ½ (Tustin / trapezoid)
    zoh:             Ā = exp(ΔA),  B̄ = A^{-1}(exp(ΔA) − I) B = ∫_0^Δ exp(sA) ds B   (exact for an input held
                     constant over each step; computed as the top blocks of exp([[ΔA, ΔB], [0, 0]]) for dense
                     A, so a singular A needs no inverse, with ``ssmkit.lti.expm`` (Padé, machine precision;
                     torch's own matrix_exp is ~1e-11 off for a single small-norm matrix); (e^z − 1)/z with a
                     series near z = 0 for diagonal A)

Fast paths: ``discretize`` validates its arguments and dispatches to ``discretize_dense`` or
``discretize_diagonal``, which take tensors already checked and cast (the layers call these directly, so a
forward pass pays no validation).

Convention (as S4): u_k is applied over the step that ends at t_k = (k+1)Δ, so x_k = x(t_k) exactly for ZOH.
Stability: if the discrete Ā has a mode with |λ(Ā)| > 1 (spectral radius above one) a RuntimeWarning says
so, and whether A itself was unstable or the method (e.g. Euler with a large Δ) amplified a stable A.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ssmkit.lti._checks import broadcast_lead, check_tensor, common_dtype, shape, structure
from ssmkit.lti.expm import expm

METHODS = ("euler", "backward_euler", "bilinear", "zoh", "gbt")
_ALPHA = {"euler": 0.0, "backward_euler": 1.0, "bilinear": 0.5}


def discretize(
    A: Tensor,
    B: Tensor,
    dt: float | Tensor,
    method: str = "zoh",
    alpha: float | None = None,
    *,
    diagonal: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Discretise (A, B) with step Δ.

    Args:
        A: (..., n, n) dense or (..., n) diagonal; float32/float64/complex64/complex128.
        B: (..., n, p), or (..., n) with diagonal A (p = 1, one input per channel).
        dt: Δ > 0, a float or a real tensor broadcasting over the leading dims ``...`` of A and B.
        method: ``"euler"``, ``"backward_euler"``, ``"bilinear"``, ``"zoh"`` or ``"gbt"``.
        alpha: α for ``"gbt"`` (0 = Euler, ½ = bilinear, 1 = backward Euler); only for ``"gbt"``.
        diagonal: force the reading of A as dense (False) or diagonal (True); needed only when the shapes
            fit both (A (n, n) with B (n, n)).
    Returns:
        (Ab, Bb): Ā with A's layout and B̄ with B's layout, leading dims broadcast over A, B and dt; dtype
        complex if A or B is complex, in the common precision of the inputs.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gbt":
        if alpha is None or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1] for method 'gbt', got {alpha!r}")
        alpha = float(alpha)
    elif alpha is not None:
        raise ValueError(f"alpha is only used by method 'gbt'; got alpha={alpha!r} with method {method!r}")
    check_tensor("A", A, min_dim=1)
    check_tensor("B", B, min_dim=1)
    if not isinstance(dt, Tensor):
        if isinstance(dt, bool) or not isinstance(dt, (int, float)):
            raise ValueError(f"dt must be a float or a real tensor, got {type(dt).__name__}")
        dt = torch.tensor(float(dt), dtype=A.real.dtype, device=A.device)
    check_tensor("dt", dt, allow_complex=False)
    if not bool((dt > 0).all()):
        raise ValueError(f"dt must be > 0 everywhere, got min {dt.min().item():.3g} (shape {shape(dt)})")
    dtype = common_dtype(A=A, B=B, dt=dt)
    kind = structure(A, B, diagonal)
    a_lead = A.shape[:-2] if kind == "dense" else A.shape[:-1]
    b_lead = B.shape[:-1] if kind == "diag_siso" else B.shape[:-2]
    lead = broadcast_lead(A=tuple(a_lead), B=tuple(b_lead), dt=shape(dt))
    A, B = A.to(dtype), B.to(dtype)
    dtr = dt.to(dtype)

    if kind == "dense":
        Ab, Bb = discretize_dense(A, B, dtr, method, alpha)
    else:
        Ab, Bb = discretize_diagonal(A, B, dtr, method, alpha)
        Ab = Ab.expand(*lead, A.shape[-1])  # (..., n) over all leading dims
    _warn_if_amplifying(A, dtr.real, dense=kind == "dense", method=method, alpha=alpha)
    return Ab, Bb


def discretize_dense(
    A: Tensor, B: Tensor, dt: Tensor, method: str = "zoh", alpha: float | None = None
) -> tuple[Tensor, Tensor]:
    """Fast path of ``discretize`` for dense A, without validation.

    Args:
        A: (..., n, n).  B: (..., n, p).  dt: real or same-dtype tensor broadcasting over the leading dims.
        method, alpha: as in ``discretize`` (``alpha`` only for ``"gbt"``).
    Returns:
        Ā (..., n, n), B̄ (..., n, p), leading dims broadcast.
    """
    n, p = A.shape[-1], B.shape[-1]
    lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], dt.shape)
    dtA = dt[..., None, None] * A  # (..., n, n)
    dtB = dt[..., None, None] * B  # (..., n, p)
    dtA = dtA.expand(*lead, n, n)  # (..., n, n)
    dtB = dtB.expand(*lead, n, p)  # (..., n, p)
    eye = torch.eye(n, dtype=dtA.dtype, device=A.device)  # (n, n)
    if method == "zoh":
        top = torch.cat([dtA, dtB], dim=-1)  # (..., n, n+p)
        M = torch.cat([top, torch.zeros(*lead, p, n + p, dtype=top.dtype, device=A.device)], dim=-2)
        E = expm(M)  # (..., n+p, n+p) = [[Ā, B̄], [0, I]]
        return E[..., :n, :n], E[..., :n, n:]  # (..., n, n), (..., n, p)
    a = _ALPHA.get(method, alpha)
    if a == 0.0:
        return eye + dtA, dtB.clone()  # (..., n, n), (..., n, p)
    lhs = eye - a * dtA  # (..., n, n)
    rhs = torch.cat([eye + (1 - a) * dtA, dtB], dim=-1)  # (..., n, n+p)
    X = torch.linalg.solve(lhs, rhs)  # (..., n, n+p)
    return X[..., :n], X[..., n:]  # (..., n, n), (..., n, p)


def discretize_diagonal(
    A: Tensor, B: Tensor, dt: Tensor, method: str = "zoh", alpha: float | None = None
) -> tuple[Tensor, Tensor]:
    """Fast path of ``discretize`` for diagonal A, without validation.

    Args:
        A: (..., n).  B: (..., n) (SISO, same number of dims as A) or (..., n, p).
        dt: tensor broadcasting over the leading dims.  method, alpha: as in ``discretize``.
    Returns:
        Ā (..., n) (leading dims of A and dt), B̄ with B's layout.
    """
    siso = B.dim() == A.dim()
    dtA = dt[..., None] * A  # (..., n)
    dtb = dt[..., None] if siso else dt[..., None, None]  # Δ shaped to B
    if method == "zoh":
        Ab = torch.exp(dtA)  # (..., n)
        small = dtA.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(dtA), dtA)  # (..., n)
        series = 1 + dtA / 2 * (1 + dtA / 3 * (1 + dtA / 4))  # 1 + z/2 + z²/6 + z³/24, error < |z|⁴/120
        phi = torch.where(small, series, torch.expm1(safe) / safe)  # (e^z − 1)/z
        gain = phi if siso else phi[..., None]  # (..., n) or (..., n, 1)
        return Ab, gain * dtb * B  # (..., n), (..., n[, p])
    a = _ALPHA.get(method, alpha)
    inv = 1 / (1 - a * dtA)  # (..., n)
    Ab = inv * (1 + (1 - a) * dtA)  # (..., n)
    gain = inv if siso else inv[..., None]
    return Ab, gain * dtb * B  # (..., n), (..., n[, p])


def _warn_if_amplifying(A: Tensor, dt: Tensor, dense: bool, method: str, alpha: float | None) -> None:
    """RuntimeWarning when the discrete system grows: max |λ(Ā)| > 1 (+ a tolerance for round-off).

    λ(Ā) is a scalar function of z = Δλ(A) for every method here — e^z for ZOH, (1 + (1−α)z)/(1 − αz) for
    the GBT family — so only A (not the broadcast Ā) is diagonalised.
    """
    with torch.no_grad():
        lam = A.detach().to(torch.complex128)
        lam = torch.linalg.eigvals(lam) if dense else lam  # (..., n)
        if lam.numel() == 0:
            return
        z = dt.detach().to(torch.complex128)[..., None] * lam  # (..., n)
        if method == "zoh":
            lam_d = torch.exp(z)  # (..., n)
        else:
            a = _ALPHA.get(method, alpha)
            lam_d = (1 + (1 - a) * z) / (1 - a * z)  # (..., n)
        rho = lam_d.abs().max().item()
        tol = 1e-8 if A.dtype in (torch.float64, torch.complex128) else 1e-4
        if rho <= 1 + tol:
            return
        re_max = lam.real.max().item()
    cause = (
        f"A itself is unstable (max Re λ(A) = {re_max:.3g} > 0)"
        if re_max > 0
        else f"A is stable (max Re λ(A) = {re_max:.3g}) but method {method!r} amplifies it at this Δ"
    )
    warnings.warn(
        f"discretize: the discrete system is unstable, spectral radius of Ā = {rho:.6g} > 1; {cause}",
        RuntimeWarning,
        stacklevel=3,
    )
