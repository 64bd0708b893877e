"""S4D: kernel vs a brute-force real state-space model discretised by scipy; one forward == chunked
forwards == a loop of step == scipy's recurrence (the state protocol); the LegS spectrum; gradients;
bad input and empty dims. References are independent of ssmkit: each conjugate pair is
rewritten as a real 2×2 block, discretised with ``scipy.signal.cont2discrete`` and powered in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import cont2discrete

from ssmkit.layers.s4d import S4D, LTIState, complex_dtype

LENGTHS = (1, 7, 64, 100)


def real_system(layer: S4D):
    """Per channel (A_r, B_r, C_r, Δ) of the equivalent real n-state system, in float64 numpy.

    x = p + iq with x' = a x + b u, y = 2·Re(c x):  p' = Re a p − Im a q + Re b u,
    q' = Im a p + Re a q + Im b u,  y = 2 Re c p − 2 Im c q.
    """
    with torch.no_grad():
        a = torch.complex(-torch.exp(layer.A_log_re), layer.A_im).to(torch.complex128).numpy()  # (d, n/2)
        b = torch.view_as_complex(layer.B.double()).numpy()  # (d, n/2)
        c = torch.view_as_complex(layer.C.double()).numpy()  # (d, n/2)
        dt = torch.exp(layer.log_dt.double()).numpy()  # (d,)
    out = []
    for ch in range(a.shape[0]):
        n2 = a.shape[1]
        A = np.zeros((2 * n2, 2 * n2))
        B = np.zeros((2 * n2, 1))
        C = np.zeros((1, 2 * n2))
        for i in range(n2):
            p, q = 2 * i, 2 * i + 1
            A[p, p], A[p, q], A[q, p], A[q, q] = a[ch, i].real, -a[ch, i].imag, a[ch, i].imag, a[ch, i].real
            B[p, 0], B[q, 0] = b[ch, i].real, b[ch, i].imag
            C[0, p], C[0, q] = 2 * c[ch, i].real, -2 * c[ch, i].imag
        out.append((A, B, C, dt[ch]))
    return out


def brute_kernel(layer: S4D, length: int) -> np.ndarray:
    """K_k = C Ā^k B̄ (d, length) from scipy's discretisation of the full real matrix, float64."""
    rows = []
    for A, B, C, dt in real_system(layer):
        Ad, Bd, *_ = cont2discrete((A, B, C, np.zeros((1, 1))), dt, method=layer.disc)
        x, row = Bd[:, 0], []
        for _ in range(length):
            row.append(C[0] @ x)
            x = Ad @ x
        rows.append(row)
    return np.array(rows)  # (d, length)


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


def perturb(layer: torch.nn.Module, scale: float = 0.1, seed: int = 7) -> None:
    """Move every parameter off its initialisation (parity tests must not rely on init structure)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def steps(layer, x: torch.Tensor, state: LTIState) -> torch.Tensor:
    """A loop of ``step`` over (b, l, d) -> (b, l, d); ``state`` ends after the last input."""
    return torch.stack([layer.step(x[:, t], state) for t in range(x.shape[1])], 1)


def sequential_reference(layer: S4D, x: torch.Tensor, h0: torch.Tensor):
    """The recurrence h_k = Ā h_{k−1} + B̄ u_k, y_k = 2·Re(C h_k) + D u_k in complex128, from scipy's Ā, B̄
    of each real 2×2 block (independent of ssmkit's discretisation) -> (y (b, l, d), h_last (b, d, n/2))."""
    systems = real_system(layer)
    u = x.detach().double().numpy()  # (b, l, d)
    h = h0.detach().to(torch.complex128).numpy()  # (b, d, n/2)
    b, l, d = u.shape
    with torch.no_grad():
        Dv = layer.D.double().numpy()
    y = np.zeros((b, l, d))
    h_last = np.zeros_like(h)
    for c, (A, B, C, dt) in enumerate(systems):
        Ad, Bd, *_ = cont2discrete((A, B, C, np.zeros((1, 1))), dt, method=layer.disc)
        xr = np.stack([h[:, c].real, h[:, c].imag], -1).reshape(b, -1)  # (b, n) real blocks (p, q)
        for t in range(l):
            xr = xr @ Ad.T + Bd[:, 0] * u[:, t, c, None]
            y[:, t, c] = xr @ C[0] + Dv[c] * u[:, t, c]
        h_last[:, c] = xr[:, 0::2] + 1j * xr[:, 1::2]
    return y, h_last


@pytest.mark.parametrize(
    "init,disc", [("lin", "zoh"), ("inv", "bilinear"), ("legs", "zoh"), ("real", "bilinear")]
)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_forward_chunks_and_steps_equal_the_sequential_reference(init, disc, dtype, tol):
    """One forward == chunked forwards with one state == a loop of step == scipy's recurrence, outputs
    and final state, starting from a non-zero state."""
    torch.manual_seed(1)
    layer = S4D(4, 16, init=init, disc=disc, dtype=dtype)
    perturb(layer)
    x = torch.randn(2, 37, 4, dtype=dtype)
    h0 = 0.3 * torch.randn(2, 4, 8, dtype=complex_dtype(dtype))
    y_ref, h_ref = sequential_reference(layer, x, h0)
    with torch.no_grad():
        full = LTIState(h0.clone())
        y = layer(x, full)
        chunked = LTIState(h0.clone())
        y_chunks = torch.cat([layer(x[:, a:e], chunked) for a, e in [(0, 1), (1, 14), (14, 14), (14, 37)]], 1)
        stepped = LTIState(h0.clone())
        y_steps = steps(layer, x, stepped)
    for out, st in [(y, full), (y_chunks, chunked), (y_steps, stepped)]:
        assert out.dtype == dtype and st.h.dtype == complex_dtype(dtype)
        np.testing.assert_allclose(out.double().numpy(), y_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(st.h.to(torch.complex128).numpy(), h_ref, rtol=tol, atol=tol)


def test_forward_without_state_equals_zero_state():
    torch.manual_seed(2)
    layer = S4D(3, 8, init="legs", disc="bilinear", dtype=torch.float64)
    x = torch.randn(2, 29, 3, dtype=torch.float64)
    state = layer.new_state(2)
    assert isinstance(state, LTIState) and state.h.shape == (2, 3, 4) and state.h.dtype == torch.complex128
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x, state), rtol=1e-12, atol=1e-12)


def test_state_is_replaced_not_modified_and_carries_gradient():
    torch.manual_seed(3)
    layer = S4D(3, 8)
    x = torch.randn(2, 10, 3)
    h0 = torch.randn(2, 3, 4, dtype=torch.complex64, requires_grad=True)
    state = LTIState(h0)
    y = layer(x[:, :6], state)
    h_mid = state.h
    assert h_mid is not h0 and h_mid.grad_fn is not None
    y2 = layer.step(x[:, 6], state)
    assert state.h is not h_mid
    loss = y.square().sum() + y2.square().sum() + state.h.abs().square().sum()
    loss.backward()
    assert h0.grad is not None and h0.grad.abs().sum() > 0  # the gradient reached the initial state
    torch.testing.assert_close(h0.detach(), state.h.detach() * 0 + h0.detach())  # h0 itself untouched


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
    state = LTIState(torch.randn(2, 3, 4, dtype=torch.complex64))
    y = layer(x, state)
    (y.square().sum() + state.h.abs().square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    layer.zero_grad()
    state.h = state.h.detach()  # the graph of the forward above was freed by backward
    y_t = layer.step(x[:, 0], state)
    (y_t.square().sum() + state.h.abs().square().sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())


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
    with pytest.raises(ValueError, match=r"\(b, l, d=2\)"):
        layer(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="state must be an LTIState"):
        layer(torch.randn(1, 5, 2), state=torch.zeros(1, 2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"state.h must be a torch.complex64 tensor of shape \(b, d, n/2\)"):
        layer(torch.randn(1, 5, 2), state=LTIState(torch.zeros(1, 2, 3, dtype=torch.complex64)))
    with pytest.raises(ValueError, match="state.h must be a torch.complex64"):
        layer.step(torch.randn(1, 2), LTIState(torch.zeros(1, 2, 2, dtype=torch.complex128)))
    with pytest.raises(ValueError, match=r"x_t must have shape \(b, d=2\)"):
        layer.step(torch.randn(1, 1, 2), layer.new_state(1))
    with pytest.raises(ValueError, match="length"):
        layer.kernel(-1)
    with pytest.raises(ValueError, match="batch"):
        layer.new_state(-1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_input_is_refused(dtype):
    """An integer tensor used to give integer zeros silently; now one line naming the expected dtype."""
    layer = S4D(2, 4)
    x = torch.ones(1, 5, 2, dtype=dtype)
    with pytest.raises(
        ValueError,
        match=r"x must be a floating-point tensor \(the layer computes in "
        r"torch.float32\), got torch\." + str(dtype).split(".")[1],
    ):
        layer(x)
    with pytest.raises(ValueError, match="x_t must be a floating-point tensor"):
        layer.step(x[:, 0], layer.new_state(1))


@pytest.mark.parametrize("b,l", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_length_gives_empty_output_and_keeps_the_state(b, l):
    layer = S4D(3, 8, dtype=torch.float64)
    x = torch.randn(b, l, 3, dtype=torch.float64)
    assert layer(x).shape == (b, l, 3)
    state = layer.new_state(b)
    state.h = torch.randn(b, 3, 4, dtype=torch.complex128)
    before = state.h
    y = layer(x, state)
    assert y.shape == (b, l, 3) and y.dtype == torch.float64
    assert state.h is before
    if b == 0:
        assert layer.step(torch.zeros(0, 3, dtype=torch.float64), state).shape == (0, 3)


def test_float64_input_into_float32_layer_is_computed_in_float32():
    torch.manual_seed(4)
    layer = S4D(2, 4)
    x = torch.randn(1, 9, 2, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), layer(x.float()), rtol=1e-6, atol=1e-6)
