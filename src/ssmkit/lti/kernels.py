"""The SSM convolution kernel K_k = C Ā^k B̄ (k = 0 … L−1), the "convolutional mode".

References:
    Gu, Goel, Ré, "Efficiently Modeling Long Sequences with Structured State Spaces" (ICLR 2022), §2.4,
        eq. (4)–(5) (the kernel K̄) and §C.3 / ``state-spaces/s4`` ``functional/krylov.py`` (Krylov by
        repeated squaring); Gu, Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal
        State Space Models" (S4D, 2022), §3.1 (Vandermonde form for diagonal A).

Glossary (code -> paper):
    Ab, Bb, C   Ā (..., n, n) or diagonal (..., n); B̄ (..., n, p) or (..., n); C (..., q, n) or (..., n)
    K           K̄ (..., L, q, p), or (..., L) for a diagonal single-input single-output (SISO) system
    krylov      the Krylov matrix [B̄, ĀB̄, Ā²B̄, …, Ā^{L−1}B̄]

Fast paths (never L separate matrix powers):
    kernel_dense        dense Ā: Krylov by repeated squaring. With X_m = [B̄ … Ā^{m−1}B̄], the next block is
                        Ā^m X_m, and Ā^m itself is one squaring of Ā^{m/2}: log2 L squarings, O(L n² p) work.
    kernel_vandermonde  diagonal Ā: K_k = Σ_n C_n Ā_n^k B̄_n — a Vandermonde matrix (Ā_n^k) built by the same
                        doubling (each power is a product of ≤ log2 L factors, so no pow/log round-off).
The slow twin is ``kernel_sequential``: one Ā multiplication per step, in a Python loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssmkit.lti._checks import broadcast_lead, check_tensor, common_dtype, shape, structure


def krylov(A: Tensor, b: Tensor, length: int) -> Tensor:
    """[b, Ab, A²b, …, A^{length−1} b] by repeated squaring (argument order as ``kernel``).

    Args:
        A: (..., n, n).   b: (..., n, p).
        length: L >= 0.
    Returns:
        X (..., L, n, p) with X[..., k, :, :] = A^k b.
    """
    X = b[..., None, :, :]  # (..., 1, n, p)
    Apow = A  # (..., n, n) = A^m with m = X's length
    while X.shape[-3] < length:
        X = torch.cat([X, Apow[..., None, :, :] @ X], dim=-3)  # (..., 2m, n, p)
        if X.shape[-3] < length:
            Apow = Apow @ Apow  # (..., n, n)
    return X[..., :length, :, :]  # (..., L, n, p)


def powers(a: Tensor, length: int) -> Tensor:
    """Vandermonde matrix a^k, k = 0 … L−1, by doubling.  a (..., n) -> (..., L, n)."""
    V = torch.ones_like(a)[..., None, :]  # (..., 1, n)
    apow = a  # (..., n) = a^m with m = V's length
    while V.shape[-2] < length:
        V = torch.cat([V, V * apow[..., None, :]], dim=-2)  # (..., 2m, n)
        if V.shape[-2] < length:
            apow = apow * apow  # (..., n)
    return V[..., :length, :]  # (..., L, n)


def kernel_dense(Ab: Tensor, Bb: Tensor, C: Tensor, length: int) -> Tensor:
    """K (..., L, q, p) for dense Ā (..., n, n), B̄ (..., n, p), C (..., q, n), via ``krylov``."""
    X = krylov(Ab, Bb, length)  # (..., L, n, p)
    return C[..., None, :, :] @ X  # (..., L, q, p)


def kernel_vandermonde(Ab: Tensor, Bb: Tensor, C: Tensor, length: int) -> Tensor:
    """K for diagonal Ā (..., n).

    SISO: B̄ (..., n), C (..., n) -> K (..., L).   MIMO: B̄ (..., n, p), C (..., q, n) -> K (..., L, q, p).
    """
    V = powers(Ab, length)  # (..., L, n)
    if Bb.dim() == Ab.dim():  # SISO
        return (V * (C * Bb)[..., None, :]).sum(-1)  # (..., L)
    CV = C[..., None, :, :] * V[..., :, None, :]  # (..., L, q, n)
    return CV @ Bb[..., None, :, :]  # (..., L, q, p)


def kernel_sequential(
    Ab: Tensor, Bb: Tensor, C: Tensor, length: int, *, diagonal: bool | None = None
) -> Tensor:
    """Slow twin of ``kernel``: X_0 = B̄, X_{k+1} = Ā X_k, K_k = C X_k, one step at a time."""
    kind = structure(Ab, Bb, diagonal, "Ab", "Bb")
    X, ks = Bb, []
    for _ in range(length):
        if kind == "diag_siso":
            ks.append((C * X).sum(-1))  # (...)
            X = Ab * X  # (..., n)
        else:
            ks.append(C @ X)  # (..., q, p)
            X = Ab @ X if kind == "dense" else Ab[..., :, None] * X  # (..., n, p)
    if not ks:
        return kernel(Ab, Bb, C, 0, diagonal=diagonal)
    return torch.stack(ks, dim=-1 if kind == "diag_siso" else -3)  # (..., L) or (..., L, q, p)


def kernel(Ab: Tensor, Bb: Tensor, C: Tensor, length: int, *, diagonal: bool | None = None) -> Tensor:
    """The convolution kernel K_k = C Ā^k B̄, k = 0 … length−1.

    Args:
        Ab: Ā, dense (..., n, n) or diagonal (..., n).
        Bb: B̄ (..., n, p); or (..., n) with diagonal Ā for a SISO system.
        C: (..., q, n); or (..., n) for a diagonal SISO system.
        length: L >= 0.
        diagonal: force the dense/diagonal reading when the shapes fit both (see ``discretize``).
    Returns:
        K (..., L, q, p), or (..., L) for a diagonal SISO system; leading dims broadcast.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    for name, t in (("Ab", Ab), ("Bb", Bb), ("C", C)):
        check_tensor(name, t, min_dim=1)
    dtype = common_dtype(Ab=Ab, Bb=Bb, C=C)
    kind = structure(Ab, Bb, diagonal, "Ab", "Bb")
    n = Ab.shape[-1]
    if kind == "diag_siso":
        if C.shape[-1] != n:
            raise ValueError(f"C must be (..., n) with n = {n} for a diagonal SISO system, got {shape(C)}")
        broadcast_lead(Ab=shape(Ab)[:-1], Bb=shape(Bb)[:-1], C=shape(C)[:-1])
    else:
        if C.dim() < 2 or C.shape[-1] != n:
            raise ValueError(f"C must be (..., q, n) with n = {n}, got {shape(C)} (Ab {shape(Ab)})")
        a_lead = shape(Ab)[:-2] if kind == "dense" else shape(Ab)[:-1]
        broadcast_lead(Ab=a_lead, Bb=shape(Bb)[:-2], C=shape(C)[:-2])
    Ab, Bb, C = Ab.to(dtype), Bb.to(dtype), C.to(dtype)
    if kind == "dense":
        return kernel_dense(Ab, Bb, C, length)
    return kernel_vandermonde(Ab, Bb, C, length)
