"""S4D: kernel vs a brute-force real state-space model discretised by scipy, conv == recurrence, state
passing, the LegS spectrum, gradients. References are independent of ssmkit: each conjugate pair is
rewritten as a real 2×2 block, discretised with ``scipy.signal.cont2discrete`` and powered in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import cont2discrete

from ssmkit.layers.s4d import S4D

LENGTHS = (1, 7, 64, 100)


def real_system(layer: S4D):
    """Per channel (A_r, B_r, C_r, Δ) of the equivalent real 2·(N/2)-state system, in float64 numpy.

    x = p + iq with x' = a x + b u, y = 2·Re(c x):  p' = Re a p − Im a q + Re b u,
    q' = Im a p + Re a q + Im b u,  y = 2 Re c p − 2 Im c q.
    """
    with torch.no_grad():
        a = torch.complex(-torch.exp(layer.A_log_re), layer.A_im).to(torch.complex128).numpy()  # (h, n2)
        b = torch.view_as_complex(layer.B.double()).numpy()  # (h, n2)
        c = torch.view_as_complex(layer.C.double()).numpy()  # (h, n2)
        dt = torch.exp(layer.log_dt.double()).numpy()  # (h,)
    out = []
    for h in range(a.shape[0]):
        n2 = a.shape[1]
        A = np.zeros((2 * n2, 2 * n2))
        B = np.zeros((2 * n2, 1))
        C = np.zeros((1, 2 * n2))
        for i in range(n2):
            p, q = 2 * i, 2 * i + 1
            A[p, p], A[p, q], A[q, p], A[q, q] = a[h, i].real, -a[h, i].imag, a[h, i].imag, a[h, i].real
            B[p, 0], B[q, 0] = b[h, i].real, b[h, i].imag
            C[0, p], C[0, q] = 2 * c[h, i].real, -2 * c[h, i].imag
        out.append((A, B, C, dt[h]))
    return out


def brute_kernel(layer: S4D, length: int) -> np.ndarray:
    """K_k = C Ā^k B̄ (h, length) from scipy's discretisation of the full real matrix, float64."""
    rows = []
    for A, B, C, dt in real_system(layer):
        Ad, Bd, *_ = cont2discrete((A, B, C, np.zeros((1, 1))), dt, method=layer.disc)
        x, row = Bd[:, 0], []
        for _ in range(length):
            row.append(C[0] @ x)
            x = Ad @ x
        rows.append(row)
    return np.array(rows)  # (h, length)


def rel_err(actual: torch.Tensor, expected: np.ndarray) -> float:
    """max |actual − expected| / max |expected|."""
    a = actual.detach().double().numpy()
    return float(np.abs(a - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("init", ["lin", "inv", "real", "legs"])
@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("d_state", [4, 16, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_kernel_matches_brute_force(init, disc, d_state, dtype, tol):
    torch.manual_seed(0)
    layer = S4D(3, d_state, init=init, disc=disc, dtype=dtype)
    ref = brute_kernel(layer, max(LENGTHS))
    for L in LENGTHS:
        K = layer.kernel(L)
        assert K.shape == (3, L) and K.dtype == dtype
        assert rel_err(K, ref[:, :L]) <= tol, (init, disc, d_state, L)


@pytest.mark.parametrize(
    "init,disc", [("lin", "zoh"), ("inv", "bilinear"), ("legs", "zoh"), ("real", "bilinear")]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_equals_steps(init, disc, dtype):
    torch.manual_seed(1)
    layer = S4D(4, 16, init=init, disc=disc, dtype=dtype)
    x = torch.randn(2, 37, 4, dtype=dtype)
    with torch.no_grad():
        y, last = layer(x, return_state=True)
        state, ys = layer.new_state(2), []
        for t in range(x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [1, 13, 36])
def test_state_passing(split):
    torch.manual_seed(2)
    layer = S4D(3, 8, init="legs", disc="bilinear", dtype=torch.float64)
    x = torch.randn(2, 37, 3, dtype=torch.float64)
    with torch.no_grad():
        y, last = layer(x, return_state=True)
        y1, s1 = layer(x[:, :split], return_state=True)
        y2, s2 = layer(x[:, split:], state=s1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, last, rtol=1e-10, atol=1e-10)


def test_legs_eigenvalues_are_those_of_the_normal_part_of_hippo_legs():
    N = 32
    n = np.arange(N)
    r = np.sqrt(2 * n + 1)
    A = -np.tril(np.outer(r, r), -1) - np.diag(n + 1.0)  # HiPPO-LegS (stable convention)
    P = np.sqrt(n + 0.5)
    normal = A + np.outer(P, P)  # −I/2 + skew-symmetric
    ev = np.linalg.eigvals(normal)
    expected = ev[np.argsort(ev.imag)]
    layer = S4D(2, N, init="legs", dtype=torch.float64)
    a = torch.complex(-torch.exp(layer.A_log_re[0]), layer.A_im[0]).detach().numpy()  # (N/2,)
    got = np.concatenate([a, a.conj()])
    got = got[np.argsort(got.imag)]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.real, -0.5, rtol=1e-12)


def test_closed_form_inits_and_dt_range():
    N = 16
    lin = S4D(5, N, init="lin", dtype=torch.float64)
    inv = S4D(5, N, init="inv", dtype=torch.float64)
    real = S4D(5, N, init="real", dtype=torch.float64)
    n = torch.arange(N // 2, dtype=torch.float64)
    torch.testing.assert_close(lin.A_im[0].detach().abs(), math.pi * n)
    torch.testing.assert_close(inv.A_im[0].detach().abs(), (N / math.pi) * (N / (2 * n + 1) - 1))
    torch.testing.assert_close(torch.exp(real.A_log_re[0]).detach(), n + 1)
    dt = torch.exp(S4D(1000, 4, dt_min=1e-3, dt_max=1e-1).log_dt.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 1e-1 * (1 + 1e-6)
    assert dt.min() < 2e-3 and dt.max() > 5e-2  # log-uniform over the whole range


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_gradients_reach_every_parameter(disc):
    torch.manual_seed(3)
    layer = S4D(3, 8, init="lin", disc=disc)
    x = torch.randn(2, 20, 3)
    s0 = torch.randn(2, 3, 4, dtype=torch.complex64)
    y, s = layer(x, state=s0, return_state=True)
    (y.square().sum() + s.abs().square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_ssm_parameters_are_tagged():
    layer = S4D(2, 4)
    tagged = {n for n, p in layer.named_parameters() if hasattr(p, "_ssm_optim")}
    assert tagged == {"log_dt", "A_log_re", "A_im", "B"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="d_state"):
        S4D(2, 5)
    with pytest.raises(ValueError, match="init"):
        S4D(2, 4, init="nope")
    with pytest.raises(ValueError, match="disc"):
        S4D(2, 4, disc="euler")
    with pytest.raises(ValueError, match="dt_min"):
        S4D(2, 4, dt_min=0.2, dt_max=0.1)
    layer = S4D(2, 4)
    with pytest.raises(ValueError, match=r"\(b, l, h=2\)"):
        layer(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="state"):
        layer(torch.randn(1, 5, 2), state=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="length"):
        layer.kernel(-1)
