"""S4 (DPLR, bilinear, Cauchy + Woodbury kernel): kernel vs brute-force powers of the full discretised
matrix (numpy, float64), vs the real HiPPO-LegS system discretised by scipy, length doubling of C̃,
conv == recurrence, state passing, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import cont2discrete

from ssmkit.layers.s4 import S4

LENGTHS = (1, 7, 64, 100)


def full_system(layer: S4):
    """Per channel dense complex (A, B, C_true, Δ) over the completed N states, float64 numpy.

    Must be called before the first kernel call (while ``C`` still holds the true C).
    """
    assert int(layer.l_kernel) == 0
    with torch.no_grad():
        as_c = lambda t: torch.view_as_complex(t.double()).numpy()  # noqa: E731
        lam = torch.complex(-torch.exp(layer.Lambda_log_re), layer.Lambda_im).to(torch.complex128).numpy()
        P, B, C = as_c(layer.P), as_c(layer.B), as_c(layer.C)
        dt = torch.exp(layer.log_dt.double()).numpy()
    full = lambda v: np.concatenate([v, v.conj()])  # noqa: E731
    out = []
    for h in range(lam.shape[0]):
        p = full(P[h])
        A = np.diag(full(lam[h])) - np.outer(p, p.conj())
        out.append((A, full(B[h]), full(C[h]), dt[h]))
    return out


def brute_kernel(system, length: int) -> np.ndarray:
    """K_k = Re Cᵀ Ā^k B̄ with Ā, B̄ from the bilinear rule on the dense matrix. -> (h, length)."""
    rows = []
    for A, B, C, dt in system:
        eye = np.eye(A.shape[0])
        Ad = np.linalg.solve(eye - dt / 2 * A, eye + dt / 2 * A)
        x = np.linalg.solve(eye - dt / 2 * A, dt * B)
        row = []
        for _ in range(length):
            row.append((C @ x).real)
            x = Ad @ x
        rows.append(row)
    return np.array(rows)


def rel_err(actual: torch.Tensor, expected: np.ndarray) -> float:
    a = actual.detach().double().numpy()
    return float(np.abs(a - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("d_state", [4, 16, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_kernel_matches_brute_force(d_state, dtype, tol):
    torch.manual_seed(0)
    for L in LENGTHS:
        layer = S4(3, d_state, dtype=dtype)  # fresh: C̃ is tuned to exactly L
        ref = brute_kernel(full_system(layer), L)
        K = layer.kernel(L)
        assert K.shape == (3, L) and K.dtype == dtype and int(layer.l_kernel) == L
        assert rel_err(K, ref) <= tol, (d_state, L)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_length_doubling(dtype, tol):
    torch.manual_seed(1)
    layer = S4(2, 16, dtype=dtype)
    ref = brute_kernel(full_system(layer), 400)
    for L, tuned in [(10, 10), (7, 10), (37, 40), (100, 160), (400, 640)]:
        K = layer.kernel(L)
        assert int(layer.l_kernel) == tuned
        assert rel_err(K, ref[:, :L]) <= tol, L


def test_C_tilde_is_trained():
    """After kernel(L), the parameter C holds C̃ = (I − Ā^L)ᵀ C (conjugate-completed first half)."""
    torch.manual_seed(2)
    layer = S4(2, 8, dtype=torch.float64)
    system = full_system(layer)
    L = 11
    layer.kernel(L)
    Ct = torch.view_as_complex(layer.C.detach()).numpy()
    for h, (A, _, C, dt) in enumerate(system):
        eye = np.eye(A.shape[0])
        Ad = np.linalg.solve(eye - dt / 2 * A, eye + dt / 2 * A)
        expected = (eye - np.linalg.matrix_power(Ad, L)).T @ C
        np.testing.assert_allclose(Ct[h], expected[: A.shape[0] // 2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d_state", [8, 16])
def test_kernel_equals_real_hippo_legs_system(d_state):
    """At init the layer is the real HiPPO-LegS system in the coordinates x = V* x_real: its kernel equals
    scipy's bilinear discretisation of (A_LegS, B_LegS) (closed forms, written here), C_real = conj(V) C."""
    from ssmkit.lti import nplr

    torch.manual_seed(3)
    N = d_state
    n = np.arange(N)
    r = np.sqrt(2 * n + 1)
    A_legs = -np.tril(np.outer(r, r), -1) - np.diag(n + 1.0)
    B_legs = r[:, None]
    _, _, _, V = nplr(N, "legs")
    V = V.numpy()
    Vf = np.concatenate([V, V.conj()], axis=1)  # (N, N) unitary
    layer = S4(2, N, dtype=torch.float64)
    system = full_system(layer)
    L = 50
    K = layer.kernel(L)
    for h, (_, _, C, dt) in enumerate(system):
        C_real = Vf.conj() @ C  # (N,), real up to rounding
        assert np.abs(C_real.imag).max() < 1e-10
        Ad, Bd, *_ = cont2discrete(
            (A_legs, B_legs, C_real.real[None], np.zeros((1, 1))), dt, method="bilinear"
        )
        x, ref = Bd[:, 0], []
        for _ in range(L):
            ref.append(C_real.real @ x)
            x = Ad @ x
        assert rel_err(K[h], np.array(ref)) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first", ["forward", "step"])
def test_conv_equals_steps(dtype, first):
    """Forward (Cauchy kernel + FFT) == L dense recurrent steps, whether C̃ was tuned before or after."""
    torch.manual_seed(4)
    layer = S4(3, 16, dtype=dtype)
    x = torch.randn(2, 29, 3, dtype=dtype)
    with torch.no_grad():
        if first == "forward":
            y, last = layer(x, return_state=True)
        state, ys = layer.new_state(2), []
        for t in range(x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t)
        if first == "step":
            y, last = layer(x, return_state=True)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [1, 12, 28])
def test_state_passing(split):
    torch.manual_seed(5)
    layer = S4(3, 8, dtype=torch.float64)
    x = torch.randn(2, 29, 3, dtype=torch.float64)
    with torch.no_grad():
        y, last = layer(x, return_state=True)
        y1, s1 = layer(x[:, :split], return_state=True)
        y2, s2 = layer(x[:, split:], state=s1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, last, rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter():
    torch.manual_seed(6)
    layer = S4(3, 8)
    x = torch.randn(2, 20, 3)
    s0 = torch.randn(2, 3, 4, dtype=torch.complex64)
    y, s = layer(x, state=s0, return_state=True)
    (y.square().sum() + s.abs().square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # the step path is differentiable too
    layer.zero_grad()
    y_t, s = layer.step(x[:, 0], s0)
    (y_t.square().sum() + s.abs().square().sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_ssm_parameters_are_tagged_and_bad_arguments():
    layer = S4(2, 4)
    tagged = {n for n, p in layer.named_parameters() if hasattr(p, "_ssm_optim")}
    assert tagged == {"log_dt", "Lambda_log_re", "Lambda_im", "P", "B"}
    with pytest.raises(ValueError, match="d_state"):
        S4(2, 3)
    with pytest.raises(ValueError, match=r"\(b, l, h=2\)"):
        layer(torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="x_t"):
        layer.step(torch.randn(1, 3), layer.new_state(1))


def test_demo_section_writes_the_kernel_plot(tmp_path):
    from ssmkit.demo.s4 import init_kernels, run

    kernels = init_kernels(length=64, d_state=16)
    assert set(kernels) == {"S4D-Lin", "S4D-Inv", "S4D-LegS", "S4 (DPLR LegS)"}
    for K in kernels.values():
        assert K.shape == (3, 64) and torch.isfinite(K).all() and K.abs().max() > 0
    (path,) = run(tmp_path)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
