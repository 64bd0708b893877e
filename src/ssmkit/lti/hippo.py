"""HiPPO matrices and their normal-plus-low-rank (NPLR) form.

References:
    Gu, Dao, Ermon, Rudra, Ré, "HiPPO: Recurrent Memory with Optimal Polynomial Projections" (NeurIPS 2020)
    Gu, Goel, Ré, "Efficiently Modeling Long Sequences with Structured State Spaces" (ICLR 2022), eq. (2),
        Theorem 1 (NPLR), and ``state-spaces/s4`` ``hippo.py`` (``transition``, ``rank_correction``,
        ``nplr``).

Signatures: ``hippo``, ``rank_correction`` and ``nplr`` all take ``(n, measure="legs", ...)``.

Convention (stable, as in ``state-spaces/s4``): the matrices are used as-is in ``x'(t) = A x(t) + B u(t)``;
the eigenvalues of A have non-positive real part. Everything is built in float64 and cast at the end.

Glossary (code -> paper):
    A (n, n), B (n, 1)   the HiPPO operator pair (A, B) of the chosen measure
    P (r, n)             the low-rank correction: A + P^T P is normal (S4 Thm. 1; r = 1 except LegT, r = 2)
    Lambda (n/2,)        Λ, eigenvalues of the normal part A + P^T P (one of each conjugate pair)
    V (n, n/2)           the matching orthonormal eigenvectors
    P_t (r, n/2), B_t    P̃ = V* P, B̃ = V* B  (the NPLR coordinates used by S4)

Closed forms (n, k are 0-based):
    legs:  A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k);   B_n = sqrt(2n+1)
           P_n = sqrt(n + 1/2);  A + P P^T = -I/2 + skew-symmetric
    legt:  A_nk = -1/2 sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else (-1)^(n-k));   B_n = 1/2 sqrt(2n+1)
           P = sqrt(n + 1/2) split by parity of n into two rows (rank 2)
    lagt:  A = I/2 - tril(1)  (-1 below, -1/2 on the diagonal);   B = 1;   P = sqrt(1/2) 1
    fout:  pairs (2k, 2k+1) rotate at frequency pi k:  A_{2k,2k+1} = -pi k, A_{2k+1,2k} = pi k,
           minus B B^T;  B = (1, 0, sqrt2, 0, sqrt2, 0, ...);  P = B

NPLR (S4 Thm. 1): A = V (diag(Λ) − P̃ P̃*) V*. Because A is real, eigenpairs come in conjugate pairs and
``nplr`` returns one of each (the half with Im Λ <= 0, as ``state-spaces/s4`` does): the identity holds
with V, Λ, P̃ completed by their conjugates, ``V_full = [V, conj(V)]`` etc.; ``nplr_to_dense`` does that.
Deviation from ``state-spaces/s4``: B̃ is not clipped (S4 clamps Im B̃ to [-2, 2] as an initialisation
choice); ``rank`` defaults to the measure's own rank instead of 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MEASURES = ("legs", "legt", "lagt", "fout")
_RANK = {"legs": 1, "legt": 2, "lagt": 1, "fout": 1}


def _check_measure(n: int, measure: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


def hippo(n: int, measure: str = "legs", dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The HiPPO pair (A, B) in the stable convention ``x' = A x + B u``.

    Args:
        n: state size.
        measure: ``"legs"`` (scaled Legendre), ``"legt"`` (translated Legendre), ``"lagt"`` (translated
            Laguerre) or ``"fout"`` (translated Fourier).
        dtype: output dtype (built in float64, then cast).
    Returns:
        A (n, n) and B (n, 1), ready for ``discretize(A, B, dt)`` (dense A with p = 1 input).
    """
    _check_measure(n, measure)
    q = torch.arange(n, dtype=torch.float64)  # (n,)
    row, col = q[:, None], q[None, :]  # (n, 1), (1, n)
    r = torch.sqrt(2 * q + 1)  # (n,)
    if measure == "legs":
        A = -torch.where(row > col, r[:, None] * r[None, :], torch.zeros(()))  # (n, n)
        A = A - torch.diag(q + 1)  # (n, n)
        B = r.clone()  # (n,)
    elif measure == "legt":
        sign = torch.where(row >= col, torch.ones(()), (-1.0) ** (row - col))  # (n, n)
        A = -0.5 * r[:, None] * sign * r[None, :]  # (n, n)
        B = 0.5 * r  # (n,)
    elif measure == "lagt":
        A = 0.5 * torch.eye(n, dtype=torch.float64) - torch.tril(torch.ones(n, n, dtype=torch.float64))
        B = torch.ones(n, dtype=torch.float64)  # (n,)
    else:  # fout
        freq = torch.stack([torch.zeros(n // 2 + 1), torch.arange(n // 2 + 1)], dim=-1).reshape(-1)[1:n]
        freq = freq.to(torch.float64)  # (n-1,) = [0, 0, 1, 0, 2, 0, 3, ...]
        B = _fout_B(n)  # (n,)
        A = math.pi * (torch.diag(freq, -1) - torch.diag(freq, 1)) - B[:, None] * B[None, :]  # (n, n)
    return A.to(dtype), B[:, None].to(dtype)


def _fout_B(n: int) -> Tensor:
    B = torch.zeros(n, dtype=torch.float64)  # (n,)
    B[0::2] = math.sqrt(2.0)
    B[0] = 1.0
    return B


def rank_correction(
    n: int, measure: str = "legs", rank: int | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """P (rank, n) with ``A + P^T P`` normal (a multiple of I plus a skew-symmetric matrix).

    ``rank`` defaults to the measure's own rank (2 for ``legt``, else 1); a larger rank pads with zeros.
    """
    _check_measure(n, measure)
    own = _RANK[measure]
    rank = own if rank is None else rank
    if not isinstance(rank, int) or rank < own:
        raise ValueError(f"rank must be an int >= {own} for measure {measure!r}, got {rank!r}")
    q = torch.arange(n, dtype=torch.float64)  # (n,)
    if measure == "legs":
        P = torch.sqrt(q + 0.5)[None]  # (1, n)
    elif measure == "legt":
        p = torch.sqrt(q + 0.5)  # (n,) = sqrt(2n+1) / sqrt(2)
        odd = (q % 2 == 1).to(torch.float64)  # (n,)
        P = torch.stack([p * odd, p * (1 - odd)])  # (2, n)
    elif measure == "lagt":
        P = math.sqrt(0.5) * torch.ones(1, n, dtype=torch.float64)  # (1, n)
    else:  # fout
        P = _fout_B(n)[None]  # (1, n)
    if rank > own:
        P = torch.cat([P, torch.zeros(rank - own, n, dtype=torch.float64)])  # (rank, n)
    return P.to(dtype)


def nplr(
    n: int, measure: str = "legs", rank: int | None = None, dtype: torch.dtype = torch.complex128
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normal-plus-low-rank form of a HiPPO matrix: A = V (diag(Λ) − P̃ P̃*) V*.

    Diagonalises the normal part ``A + P^T P = c I + S`` (S skew-symmetric) through the Hermitian matrix
    ``-i S`` in complex128, and keeps one eigenpair of each conjugate pair (Im Λ <= 0, most negative
    first). A zero eigenvalue pair (``fout``) gets the eigenvector ``(q0 + i q1)/sqrt(2)`` built from a real
    orthonormal basis (q0, q1) of that eigenspace, so that its conjugate is the other member of the pair.

    Args:
        n: state size, even.
        measure: one of ``"legs"``, ``"legt"``, ``"lagt"``, ``"fout"``.
        rank: rank of the correction (default: the measure's own rank).
        dtype: complex output dtype (computed in complex128).
    Returns:
        Lambda (n/2,), P (rank, n/2) = V* P_real, B (n/2,) = V* B, V (n, n/2); all complex.
    """
    _check_measure(n, measure)
    if n % 2:
        raise ValueError(f"n must be even for nplr (conjugate pairs), got n = {n}")
    if dtype not in (torch.complex64, torch.complex128):
        raise ValueError(f"dtype must be torch.complex64 or torch.complex128, got {dtype}")
    A, B = hippo(n, measure)  # (n, n), (n, 1) float64
    P = rank_correction(n, measure, rank)  # (r, n)
    AP = A + P.T @ P  # (n, n), normal
    c = torch.diagonal(AP).mean()  # () = -1/2 for legs, 0 for legt/lagt/fout
    S = AP - c * torch.eye(n, dtype=torch.float64)  # (n, n) skew-symmetric
    skew_err = (S + S.T).abs().max().item()
    if skew_err > 1e-10 * max(1.0, S.abs().max().item()):
        raise RuntimeError(
            f"internal: A + P^T P - cI is not skew-symmetric for {measure!r} (err {skew_err:.2e})"
        )
    mu, W = torch.linalg.eigh(-1j * S.to(torch.complex128))  # (n,), (n, n): S = i W diag(mu) W*
    tol = 1e-9 * max(1.0, mu.abs().max().item())
    zero = mu.abs() <= tol  # (n,)
    n_zero = int(zero.sum())
    neg = (mu < -tol).nonzero().squeeze(-1)  # indices, ascending mu = most negative first
    lam = [c + 1j * mu[neg]]  # Λ = c + i mu
    vec = [W[:, neg]]  # (n, #neg)
    if n_zero:
        W0 = W[:, zero]  # (n, z) complex basis of the null space of S (a real subspace)
        U, _, _ = torch.linalg.svd(torch.cat([W0.real, W0.imag], dim=1), full_matrices=False)
        Q = U[:, :n_zero]  # (n, z) real orthonormal basis
        V0 = (Q[:, 0::2] + 1j * Q[:, 1::2]) / math.sqrt(2.0)  # (n, z/2)
        lam.append(torch.full((n_zero // 2,), complex(c.item()), dtype=torch.complex128))
        vec.append(V0.to(torch.complex128))
    Lambda = torch.cat(lam)  # (n/2,)
    V = torch.cat(vec, dim=1)  # (n, n/2)
    if V.shape[1] != n // 2:
        raise RuntimeError(f"internal: expected {n // 2} eigenpairs, found {V.shape[1]}")
    Vh = V.conj().T  # (n/2, n)
    P_t = (Vh @ P.to(torch.complex128).T).T  # (r, n/2)
    B_t = Vh @ B[:, 0].to(torch.complex128)  # (n/2,)
    return Lambda.to(dtype), P_t.to(dtype), B_t.to(dtype), V.to(dtype)


def nplr_to_dense(Lambda: Tensor, P: Tensor, V: Tensor) -> Tensor:
    """Rebuild the real A (n, n) from ``nplr``'s half spectrum: complete each conjugate pair, then
    ``A = V_full (diag(Λ_full) − P̃_full^T conj(P̃_full)) V_full*`` (the real part is taken at the end).

    Args:
        Lambda (n/2,), P (r, n/2), V (n, n/2): complex, as returned by ``nplr``.
    Returns:
        A (n, n), real dtype matching the precision of the inputs.
    """
    Lf = torch.cat([Lambda, Lambda.conj()])  # (n,)
    Pf = torch.cat([P, P.conj()], dim=-1)  # (r, n)
    Vf = torch.cat([V, V.conj()], dim=-1)  # (n, n)
    core = torch.diag(Lf) - Pf.T @ Pf.conj()  # (n, n)
    return (Vf @ core @ Vf.conj().T).real  # (n, n)
