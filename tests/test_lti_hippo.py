"""HiPPO matrices, their NPLR form, and the HiPPO memory property.

References used here (independent of the code under test): the closed forms written out entry by entry
in Python loops (S4 paper eq. (2); ``state-spaces/s4`` ``transition``), numpy's eigen-solver, and
numpy's Legendre series for the reconstruction.
"""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import legendre as npl

from ssmkit.lti import discretize, hippo, nplr, nplr_to_dense, rank_correction, scan

MEASURES = ["legs", "legt", "lagt", "fout"]


def closed_form(measure: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) entry by entry, as in the S4 paper / state-spaces/s4 (stable convention)."""
    A, B = np.zeros((n, n)), np.zeros(n)
    for i in range(n):
        for k in range(n):
            ri, rk = math.sqrt(2 * i + 1), math.sqrt(2 * k + 1)
            if measure == "legs":
                A[i, k] = -ri * rk if i > k else (-(i + 1) if i == k else 0.0)
            elif measure == "legt":
                A[i, k] = -0.5 * ri * rk * (1.0 if i >= k else (-1.0) ** (i - k))
            elif measure == "lagt":
                A[i, k] = -1.0 if i > k else (-0.5 if i == k else 0.0)
        if measure == "legs":
            B[i] = math.sqrt(2 * i + 1)
        elif measure == "legt":
            B[i] = 0.5 * math.sqrt(2 * i + 1)
        elif measure == "lagt":
            B[i] = 1.0
    if measure == "fout":
        for i in range(n):
            B[i] = 1.0 if i == 0 else (math.sqrt(2) if i % 2 == 0 else 0.0)
        for k in range(1, n // 2 + 1):  # the pair (2k, 2k+1) rotates at frequency pi k
            if 2 * k + 1 < n:
                A[2 * k, 2 * k + 1] = -math.pi * k
                A[2 * k + 1, 2 * k] = math.pi * k
        A -= np.outer(B, B)
    return A, B[:, None]


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("n", [1, 2, 5, 8, 64])
def test_hippo_equals_closed_form(measure, n):
    A, B = hippo(n, measure)
    A_ref, B_ref = closed_form(measure, n)
    assert A.shape == (n, n) and B.shape == (n, 1) and A.dtype == torch.float64
    np.testing.assert_allclose(A.numpy(), A_ref, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(B.numpy(), B_ref, rtol=1e-14, atol=1e-14)


def test_hippo_legs_n4_matches_reference_numbers():
    """The N = 4 LegS matrix as printed in The Annotated S4 (4 digits)."""
    expected = [[-1, 0, 0, 0], [-1.732, -2, 0, 0], [-2.236, -3.873, -3, 0], [-2.646, -4.583, -5.916, -4]]
    np.testing.assert_allclose(hippo(4)[0].numpy(), expected, atol=6e-4)


def test_hippo_float32_is_cast_from_float64():
    A64, B64 = hippo(16, "legs")
    A32, B32 = hippo(16, "legs", dtype=torch.float32)
    assert A32.dtype == torch.float32 and B32.dtype == torch.float32
    torch.testing.assert_close(A32, A64.float(), rtol=0, atol=0)


@pytest.mark.parametrize("measure", MEASURES)
def test_stable(measure):
    A, _ = hippo(32, measure)
    assert np.linalg.eigvals(A.numpy()).real.max() <= 1e-9


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("n", [4, 16, 64])
def test_rank_correction_makes_A_normal(measure, n):
    """A + P^T P = c I + skew-symmetric, with c = -1/2 for LegS (S4 Thm. 1) and 0 for the others."""
    A, _ = hippo(n, measure)
    P = rank_correction(n, measure)
    S = (A + P.T @ P).numpy()
    c = -0.5 if measure == "legs" else 0.0
    skew = S - c * np.eye(n)
    np.testing.assert_allclose(skew, -skew.T, rtol=0, atol=1e-12)
    if measure == "legs":  # P_n = sqrt(n + 1/2)
        np.testing.assert_allclose(P.numpy()[0], np.sqrt(np.arange(n) + 0.5), rtol=1e-15)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("n", [2, 8, 64, 128])
def test_nplr_reconstructs_A(measure, n):
    """A = V_full (diag(Λ_full) − P̃_full P̃_full*) V_full*, completed with conjugates here in numpy."""
    Lambda, P, B, V = (t.numpy() for t in nplr(n, measure))
    r = 2 if measure == "legt" else 1
    assert (
        Lambda.shape == (n // 2,)
        and P.shape == (r, n // 2)
        and B.shape == (n // 2,)
        and V.shape == (n, n // 2)
    )
    assert (Lambda.imag <= 1e-12).all()
    Lf = np.concatenate([Lambda, Lambda.conj()])
    Pf = np.concatenate([P, P.conj()], axis=1)  # (r, n)
    Vf = np.concatenate([V, V.conj()], axis=1)  # (n, n)
    np.testing.assert_allclose(Vf.conj().T @ Vf, np.eye(n), atol=1e-10)
    A_rec = Vf @ (np.diag(Lf) - Pf.T @ Pf.conj()) @ Vf.conj().T
    A_ref, B_ref = closed_form(measure, n)
    np.testing.assert_allclose(A_rec.real, A_ref, rtol=0, atol=1e-6 * max(1.0, np.abs(A_ref).max()))
    np.testing.assert_allclose(A_rec.imag, 0, atol=1e-6 * max(1.0, np.abs(A_ref).max()))
    # B̃ = V* B: B is recovered by the completed basis.
    Bf = np.concatenate([B, B.conj()])
    np.testing.assert_allclose((Vf @ Bf).real, B_ref[:, 0], atol=1e-9)
    # The library's own rebuild agrees.
    np.testing.assert_allclose(
        nplr_to_dense(*(torch.from_numpy(x) for x in (Lambda, P, V))).numpy(), A_ref, atol=1e-6
    )


def test_nplr_legs_eigenvalues_match_numpy():
    """Λ are the eigenvalues of A + P P^T (numpy's general eigen-solver on the closed form)."""
    n = 64
    A_ref, _ = closed_form("legs", n)
    P = np.sqrt(np.arange(n) + 0.5)
    ev = np.linalg.eigvals(A_ref + np.outer(P, P))
    ev = ev[ev.imag < 0]
    Lambda = nplr(n, "legs")[0].numpy()
    np.testing.assert_allclose(np.sort(Lambda.imag), np.sort(ev.imag), rtol=1e-8)
    np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)
    # the positive imaginary parts of HiPPO-LegS's normal part run 0.264, 0.906, ..., 433.0, 1303.3 for N = 64
    np.testing.assert_allclose(
        np.sort(-Lambda.imag)[[0, 1, -2, -1]], [0.264, 0.906, 433.0, 1303.3], atol=0.06
    )


def test_nplr_bad_input():
    with pytest.raises(ValueError, match="n must be even"):
        nplr(5, "legs")
    with pytest.raises(ValueError, match="measure"):
        nplr(4, "legx")
    with pytest.raises(ValueError, match="measure"):
        hippo(4, "chebyshev")
    with pytest.raises(ValueError, match="n must be a positive int"):
        hippo(0)


def test_siblings_take_n_then_measure():
    """hippo, rank_correction and nplr share one argument order, (n, measure="legs")."""
    A, B = hippo(8)
    P = rank_correction(8)
    Lambda, Pt, Bt, V = nplr(8)
    torch.testing.assert_close(A, hippo(8, measure="legs")[0])
    torch.testing.assert_close(P, rank_correction(n=8, measure="legs"))
    torch.testing.assert_close(Lambda, nplr(n=8, measure="legs")[0])
    torch.testing.assert_close(nplr_to_dense(Lambda, Pt, V), A, rtol=1e-10, atol=1e-10)
    for f in (hippo, rank_correction, nplr):  # the old (measure, n) order is refused, naming n
        with pytest.raises(ValueError, match="n must be a positive int, got 'legs'"):
            f("legs", 8)


# --- HiPPO memory property -------------------------------------------------------------------------------


def runge(s):
    return 1.0 / (1.0 + 25.0 * (2.0 * s - 1.0) ** 2)


def memory_error(A: torch.Tensor, B: torch.Tensor, L: int = 1000) -> float:
    """Drive x' = (1/t)(A x + B u) (scaled, as HiPPO-LegS) with u on [0, 1]; read the state at t = 1 as
    Legendre coefficients, u(s) ≈ Σ_n x_n sqrt(2n+1) P_n(2s − 1), and return the relative RMS error over the
    whole history s ∈ [0, 1].

    In log-time τ = ln t the system is LTI, so ZOH with Δτ_k = ln(k/(k−1)) is exact for an input held on
    each step; u is sampled at step midpoints (midpoint rule). The first step starts from x = (u_0, 0, …),
    the projection of a constant.
    """
    n = A.shape[0]
    t_mid = (torch.arange(1, L + 1, dtype=torch.float64) - 0.5) / L
    u = runge(t_mid)  # (L,)
    k = torch.arange(2, L + 1, dtype=torch.float64)
    Ab, Bb = discretize(A, B, torch.log(k / (k - 1)), "zoh")  # (L-1, n, n), (L-1, n, 1)
    x0 = torch.zeros(n, dtype=torch.float64)
    x0[0] = u[0]
    h = scan(Ab, Bb[..., 0] * u[1:, None], state=x0)  # (L-1, n)
    s = np.linspace(0, 1, 2001)
    rec = npl.legval(2 * s - 1, h[-1].numpy() * np.sqrt(2 * np.arange(n) + 1))
    ref = runge(s)
    return float(np.sqrt(np.mean((rec - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


@pytest.mark.slow
def test_hippo_legs_memory_reconstructs_history():
    sizes = [8, 16, 32, 64]
    errs = [memory_error(*hippo(n, "legs")) for n in sizes]
    for e_small, e_big in zip(errs, errs[1:]):
        assert e_big < e_small / 3, errs
    assert errs[-1] < 1e-3, errs
    # A random stable A of the same size (eigenvalues in the left half plane) does not remember.
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        M = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
        shift = torch.linalg.eigvals(M).real.max() + 0.5
        A_rand = M - shift * torch.eye(n, dtype=torch.float64)  # max Re λ = -0.5
        B_rand = torch.randn(n, 1, generator=g, dtype=torch.float64)
        assert memory_error(A_rand, B_rand) > 0.5
