"""discretize against scipy.signal.cont2discrete / scipy.linalg.expm; convergence order against the exact
continuous response; continuous_response against an ODE solver.
"""

import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.signal
import torch

from ssmkit.lti import continuous_response, discretize, expm, hippo, recurrent

SCIPY_NAME = {"euler": "euler", "backward_euler": "backward_diff", "bilinear": "bilinear", "zoh": "zoh"}
F64 = dict(rtol=1e-10, atol=1e-12)
# Some scipy comparisons use Δ where Euler-like methods amplify; that warning is tested on its own below.
pytestmark = pytest.mark.filterwarnings("ignore:discretize. the discrete system is unstable:RuntimeWarning")


def stable_dense(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M - (torch.linalg.eigvals(M).real.max() + 0.5) * torch.eye(n, dtype=torch.float64)
    return A.to(dtype)


def scipy_disc(A: np.ndarray, B: np.ndarray, dt: float, method: str, alpha=None):
    n, p = B.shape
    C, D = np.zeros((1, n)), np.zeros((1, p))
    if method == "gbt":
        out = scipy.signal.cont2discrete((A, B, C, D), dt, method="gbt", alpha=alpha)
    else:
        out = scipy.signal.cont2discrete((A, B, C, D), dt, method=SCIPY_NAME[method])
    return out[0], out[1]


CASES = [("euler", None), ("backward_euler", None), ("bilinear", None), ("zoh", None)]
CASES += [("gbt", a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]


@pytest.mark.parametrize("method,alpha", CASES)
@pytest.mark.parametrize("dt", [1e-3, 0.1, 0.7])
def test_dense_matches_scipy(method, alpha, dt):
    A = stable_dense(5, seed=1)
    B = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Ab, Bb = discretize(A, B, dt, method, alpha)
    Ad, Bd = scipy_disc(A.numpy(), B.numpy(), dt, method, alpha)
    torch.testing.assert_close(Ab, torch.from_numpy(Ad), **F64)
    torch.testing.assert_close(Bb, torch.from_numpy(Bd), **F64)


@pytest.mark.parametrize("method,alpha", CASES)
def test_batched_dense_one_dt_per_channel(method, alpha):
    d, n, p = 3, 4, 2
    A = torch.stack([stable_dense(n, seed=s) for s in range(d)])  # (d, n, n)
    B = torch.randn(d, n, p, dtype=torch.float64)
    dt = torch.tensor([0.01, 0.1, 0.5], dtype=torch.float64)
    Ab, Bb = discretize(A, B, dt, method, alpha)
    assert Ab.shape == (d, n, n) and Bb.shape == (d, n, p)
    for i in range(d):
        Ad, Bd = scipy_disc(A[i].numpy(), B[i].numpy(), float(dt[i]), method, alpha)
        torch.testing.assert_close(Ab[i], torch.from_numpy(Ad), **F64)
        torch.testing.assert_close(Bb[i], torch.from_numpy(Bd), **F64)


@pytest.mark.parametrize("method,alpha", CASES)
@pytest.mark.parametrize("siso", [True, False])
def test_diagonal_real_matches_scipy(method, alpha, siso):
    """Diagonal A (d, n), one Δ per channel; each channel equals scipy on its own diagonal A."""
    d, n, p = 3, 6, 2
    g = torch.Generator().manual_seed(3)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 5 - 0.1  # (d, n)
    B = (
        torch.randn(d, n, generator=g, dtype=torch.float64)
        if siso
        else torch.randn(d, n, p, dtype=torch.float64)
    )
    dt = torch.tensor([0.02, 0.2, 1.0], dtype=torch.float64)
    Ab, Bb = discretize(A, B, dt, method, alpha)
    assert Ab.shape == (d, n) and Bb.shape == B.shape
    for i in range(d):
        Bi = B[i][:, None] if siso else B[i]
        Ad, Bd = scipy_disc(np.diag(A[i].numpy()), Bi.numpy(), float(dt[i]), method, alpha)
        torch.testing.assert_close(Ab[i], torch.from_numpy(np.diag(Ad).copy()), **F64)
        torch.testing.assert_close(Bb[i], torch.from_numpy(Bd[:, 0] if siso else Bd), **F64)


@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler", "backward_euler"])
def test_diagonal_complex(method):
    """Complex diagonal A: ZOH against scipy.linalg.expm of the Van Loan block; GBT against numpy solve."""
    g = torch.Generator().manual_seed(4)
    n = 6
    A = torch.complex(
        -torch.rand(n, generator=g, dtype=torch.float64),
        10 * torch.randn(n, generator=g, dtype=torch.float64),
    )
    A[0] = 0  # singular mode: ZOH must give B̄ = ΔB there
    B = torch.complex(*torch.randn(2, n, generator=g, dtype=torch.float64))
    dt = 0.05
    Ab, Bb = discretize(A, B, dt, method)
    assert Ab.dtype == torch.complex128
    Ad, Bd = A.numpy(), B.numpy()
    M = np.zeros((n + 1, n + 1), dtype=complex)
    M[:n, :n], M[:n, n:] = np.diag(Ad) * dt, Bd[:, None] * dt
    if method == "zoh":
        E = scipy.linalg.expm(M)
        ref_A, ref_B = np.diag(E[:n, :n]).copy(), E[:n, n].copy()
    else:
        a = {"bilinear": 0.5, "euler": 0.0, "backward_euler": 1.0}[method]
        lhs = np.eye(n) - a * dt * np.diag(Ad)
        ref_A = np.diag(np.linalg.solve(lhs, np.eye(n) + (1 - a) * dt * np.diag(Ad))).copy()
        ref_B = np.linalg.solve(lhs, dt * Bd)
    torch.testing.assert_close(Ab, torch.from_numpy(ref_A), **F64)
    torch.testing.assert_close(Bb, torch.from_numpy(ref_B), **F64)


def test_dense_complex_zoh_matches_expm():
    g = torch.Generator().manual_seed(5)
    n, p = 4, 3
    A = torch.complex(*torch.randn(2, n, n, generator=g, dtype=torch.float64)) - 3 * torch.eye(n)
    B = torch.complex(*torch.randn(2, n, p, generator=g, dtype=torch.float64))
    Ab, Bb = discretize(A, B, 0.3, "zoh")
    M = np.zeros((n + p, n + p), dtype=complex)
    M[:n, :n], M[:n, n:] = A.numpy() * 0.3, B.numpy() * 0.3
    E = scipy.linalg.expm(M)
    torch.testing.assert_close(Ab, torch.from_numpy(E[:n, :n]), **F64)
    torch.testing.assert_close(Bb, torch.from_numpy(E[:n, n:]), **F64)


def rel(actual, expected) -> float:
    """max |actual − expected| / max |expected| (numpy or torch)."""
    a, e = np.asarray(actual), np.asarray(expected)
    return float(np.abs(a - e).max() / np.abs(e).max())


# 1-norms across every branch of torch's own matrix_exp; (3.4e-4, 5e-2] is the one where torch 2.13 is
# ~1e-11 off for a single float64 matrix.
NORMS = (1e-6, 1e-3, 1e-2, 3e-2, 4.9e-2, 0.2, 1.0, 5.0, 40.0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("batch", [(), (1,), (3,)])
def test_expm_matches_scipy_to_rounding(norm, batch):
    g = torch.Generator().manual_seed(11)
    M = torch.randn(*batch, 5, 5, generator=g, dtype=torch.float64)
    M = M / M.abs().sum(-2).amax(-1)[..., None, None] * norm  # (..., 5, 5) with ‖M‖₁ = norm
    E = expm(M)
    ref = scipy.linalg.expm(M.numpy())
    assert rel(E, ref) <= 1e-14 * max(1.0, norm), (norm, batch, rel(E, ref))


def test_expm_complex_float32_and_empty():
    g = torch.Generator().manual_seed(12)
    M = torch.complex(*torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)) * 0.7
    assert rel(expm(M), scipy.linalg.expm(M.numpy())) <= 1e-14
    E32 = expm(M.real.float())
    assert E32.dtype == torch.float32 and rel(E32, scipy.linalg.expm(M.real.numpy())) <= 1e-6
    assert expm(torch.zeros(0, 3, 3)).shape == (0, 3, 3)


@pytest.mark.parametrize("dt", [1e-4, 1e-3, 5e-3, 0.05, 0.5])
def test_zoh_dense_float64_is_machine_precise(dt):
    """One dense float64 system (a batch of one: the case torch's matrix_exp gets ~1e-11 wrong) against
    scipy's cont2discrete, at 1e-14 relative."""
    A, B = hippo(6, "legs")  # (6, 6), (6, 1)
    Ab, Bb = discretize(A, B, dt, "zoh")
    ref_A, ref_B = scipy_disc(A.numpy(), B.numpy(), dt, "zoh")
    assert rel(Ab, ref_A) <= 1e-14 and rel(Bb, ref_B) <= 1e-14, (dt, rel(Ab, ref_A), rel(Bb, ref_B))
    g = torch.Generator().manual_seed(13)
    A2 = torch.randn(3, 3, generator=g, dtype=torch.float64)
    B2 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    Ab2, Bb2 = discretize(A2, B2, dt, "zoh")
    ref_A2, ref_B2 = scipy_disc(A2.numpy(), B2.numpy(), dt, "zoh")
    assert rel(Ab2, ref_A2) <= 1e-14 and rel(Bb2, ref_B2) <= 1e-14


def test_zoh_dense_matches_40_digit_mpmath():
    mpmath = pytest.importorskip("mpmath")
    A, B = hippo(4, "legs")  # (4, 4), (4, 1)
    dt = 0.004  # ‖M‖₁ ≈ 0.03 for the augmented matrix M: inside the range torch gets wrong
    Ab, Bb = discretize(A, B, dt, "zoh")
    n = 4
    with mpmath.workdps(40):
        M = mpmath.zeros(n + 1, n + 1)
        for i in range(n):
            for j in range(n):
                M[i, j] = mpmath.mpf(float(A[i, j])) * mpmath.mpf(dt)
            M[i, n] = mpmath.mpf(float(B[i, 0])) * mpmath.mpf(dt)
        E = mpmath.expm(M)
        ref = np.array([[float(E[i, j]) for j in range(n + 1)] for i in range(n)])
    assert rel(Ab, ref[:, :n]) <= 1e-15 * 4 and rel(Bb, ref[:, n:]) <= 1e-15 * 4


def test_zoh_diagonal_gain_is_machine_precise_near_zero():
    """(e^z − 1)/z for small |z| (the series branch, |z| < 1e-4) and just above it, against mpmath."""
    mpmath = pytest.importorskip("mpmath")
    z = torch.tensor([-9.9e-5, -5e-5 + 8e-5j, -1e-8, -1.01e-4, -0.3 + 2j], dtype=torch.complex128)
    _, Bb = discretize(z, torch.ones_like(z), 1.0, "zoh")
    with mpmath.workdps(40):
        ref = [
            complex((mpmath.exp(mpmath.mpc(c.real, c.imag)) - 1) / mpmath.mpc(c.real, c.imag))
            for c in z.tolist()
        ]
    err = (Bb - torch.tensor(ref, dtype=torch.complex128)).abs() / torch.tensor(ref).abs()
    assert err.max() <= 4e-16, err


def test_continuous_response_uses_the_precise_exponential():
    A, B = hippo(4, "legs")
    C = torch.ones(1, 4, dtype=torch.float64)
    u = torch.ones(1, 1, dtype=torch.float64)  # one step from x = 0: x(Δ) = B̄ u
    dt = 0.004  # inside the range where torch.linalg.matrix_exp is ~1e-10 off
    _, x = continuous_response(A, B, C, None, u, dt)
    _, ref_B = scipy_disc(A.numpy(), B.numpy(), dt, "zoh")
    assert rel(x, ref_B[:, 0]) <= 1e-14


def test_zoh_singular_dense_A():
    """ZOH needs no inverse: A = 0 gives Ā = I, B̄ = ΔB; a double integrator gives B̄ = (Δ²/2, Δ)."""
    A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    B = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    Ab, Bb = discretize(A, B, 0.5, "zoh")
    torch.testing.assert_close(Ab, torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64), **F64)
    torch.testing.assert_close(Bb, torch.tensor([[0.125], [0.5]], dtype=torch.float64), **F64)


@pytest.mark.parametrize("method,alpha", CASES)
def test_float32(method, alpha):
    A = stable_dense(5, seed=6)
    B = torch.randn(5, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Ab, Bb = discretize(A.float(), B.float(), 0.1, method, alpha)
    assert Ab.dtype == Bb.dtype == torch.float32
    Ad, Bd = scipy_disc(A.float().double().numpy(), B.float().double().numpy(), 0.1, method, alpha)
    torch.testing.assert_close(Ab, torch.from_numpy(Ad).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Bb, torch.from_numpy(Bd).float(), rtol=1e-5, atol=1e-6)


def test_gbt_endpoints_are_named_methods():
    A, B = stable_dense(4, seed=8), torch.randn(4, 1, dtype=torch.float64)
    for alpha, name in ((0.0, "euler"), (0.5, "bilinear"), (1.0, "backward_euler")):
        for x, y in zip(discretize(A, B, 0.2, "gbt", alpha), discretize(A, B, 0.2, name)):
            torch.testing.assert_close(x, y, **F64)


# --- stability warnings ------------------------------------------------------------------------------------


def test_unstable_A_with_amplifying_method_warns():
    A = torch.tensor([[0.5, 1.0], [0.0, -1.0]], dtype=torch.float64)  # eigenvalue +0.5
    B = torch.ones(2, 1, dtype=torch.float64)
    for method in ("zoh", "euler", "bilinear"):
        with pytest.warns(RuntimeWarning, match="A itself is unstable"):
            discretize(A, B, 0.1, method)
    with pytest.warns(RuntimeWarning, match="A itself is unstable"):
        discretize(
            torch.tensor([0.3, -1.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64), 0.1, "zoh"
        )


def test_euler_amplifies_stable_A_at_large_dt():
    A = torch.diag(torch.tensor([-1.0, -30.0], dtype=torch.float64))  # |1 + Δλ| = 2 at Δ = 0.1
    B = torch.ones(2, 1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="amplifies"):
        discretize(A, B, 0.1, "euler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("bilinear", "zoh", "backward_euler"):  # A-stable: no warning
            discretize(A, B, 0.1, method)
        discretize(A, B, 0.01, "euler")  # small enough Δ
        # Backward Euler damps even this unstable mode once Δλ > 2: 1 / (1 − 3) = −0.5.
        discretize(torch.tensor([[1.0]], dtype=torch.float64), B[:1], 3.0, "backward_euler", diagonal=False)


# --- the continuous reference and convergence orders ------------------------------------------------------


def ode_reference(A, B, C, D, u, dt, x0):
    """y(t_k), x(t_l) by scipy's DOP853 at tight tolerances, one hold interval at a time."""
    An, Bn, Cn, Dn = (t.numpy() for t in (A, B, C, D))
    x, ref = x0.numpy(), []
    for k in range(u.shape[0]):
        uk = u[k].numpy()
        sol = scipy.integrate.solve_ivp(
            lambda t, z, uk=uk: An @ z + Bn @ uk, (0.0, dt), x, method="DOP853", rtol=1e-13, atol=1e-13
        )
        x = sol.y[:, -1]
        ref.append(Cn @ x + Dn @ uk)
    return torch.from_numpy(np.stack(ref)), torch.from_numpy(x)


def random_system(n=3, p=2, q=2, l=12, seed=9):
    g = torch.Generator().manual_seed(seed)
    A = stable_dense(n, seed=seed + 1)
    B, C = (
        torch.randn(n, p, generator=g, dtype=torch.float64),
        torch.randn(q, n, generator=g, dtype=torch.float64),
    )
    D = torch.randn(q, p, generator=g, dtype=torch.float64)
    u = torch.randn(l, p, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, generator=g, dtype=torch.float64)
    return A, B, C, D, u, x0


def test_continuous_response_matches_ode_solver():
    A, B, C, D, u, x0 = random_system()
    y, x_last = continuous_response(A, B, C, D, u, 0.25, state=x0)
    y_ref, x_ref = ode_reference(A, B, C, D, u, 0.25, x0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x_last, x_ref, rtol=1e-9, atol=1e-10)


def test_zoh_is_exact_against_ode_solver():
    """ZOH + the recurrence reproduce the ODE solution at the sample times (piecewise-constant input)."""
    A, B, C, D, u, x0 = random_system(seed=21)
    Ab, Bb = discretize(A, B, 0.25, "zoh")
    y, x_last = recurrent(Ab, Bb, C, D, u, state=x0)
    y_ref, x_ref = ode_reference(A, B, C, D, u, 0.25, x0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x_last, x_ref, rtol=1e-9, atol=1e-10)


def convergence_errors(method: str, dts: list[float], T: float = 2.0) -> list[float]:
    """Max relative output error of (discretize + recurrent) against the exact continuous response, for the
    same piecewise-constant input u_k = g(t_k) held on each step."""
    n, p, q = 4, 1, 2
    g = torch.Generator().manual_seed(11)
    A = torch.diag(torch.tensor([-0.5, -1.0, -2.0, -3.0], dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ A @ Q.T + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)  # non-normal, stable
    B = torch.randn(n, p, generator=g, dtype=torch.float64)
    C = torch.randn(q, n, generator=g, dtype=torch.float64)
    errs = []
    for dt in dts:
        l = round(T / dt)
        t = torch.arange(1, l + 1, dtype=torch.float64) * dt
        u = (torch.sin(3 * t) + torch.cos(t))[:, None]  # (l, 1)
        y_true, _ = continuous_response(A, B, C, None, u, dt)
        Ab, Bb = discretize(A, B, dt, method)
        y, _ = recurrent(Ab, Bb, C, None, u)
        errs.append(float((y - y_true).abs().max() / y_true.abs().max()))
    return errs


DTS = [0.1, 0.05, 0.025, 0.0125, 0.00625]


@pytest.mark.parametrize("method,order", [("euler", 1.0), ("backward_euler", 1.0), ("bilinear", 2.0)])
def test_convergence_order(method, order):
    errs = convergence_errors(method, DTS)
    slope = np.polyfit(np.log(DTS), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.1, (slope, errs)


def test_zoh_error_is_roundoff_on_the_sweep():
    errs = convergence_errors("zoh", DTS)
    assert max(errs) < 1e-10, errs


@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler", "backward_euler"])
def test_discretize_is_differentiable(method):
    """Layers train A, B and Δ through discretize: finite-difference gradient check in float64."""
    g = torch.Generator().manual_seed(12)
    A_diag = torch.complex(
        -torch.rand(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    )
    B_diag = torch.complex(*torch.randn(2, 3, generator=g, dtype=torch.float64))
    dt = torch.tensor([0.1, 0.3], dtype=torch.float64)
    args = (A_diag.requires_grad_(), B_diag.requires_grad_(), dt.requires_grad_())
    assert torch.autograd.gradcheck(lambda A, B, d: discretize(A, B, d, method), args)
    A_dense = stable_dense(3, seed=13).requires_grad_()
    B_dense = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    args = (A_dense, B_dense, torch.tensor(0.2, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda A, B, d: discretize(A, B, d, method), args)
