"""The lecture's theorem — recurrent == kernel convolution == parallel scan — and each mode on its own.

Every expected value comes from code written here: a float64/complex128 Python loop of
x_k = Ā x_{k−1} + B̄ u_k, y_k = C x_k + D u_k; dense matrix powers; a direct causal sum.
"""

import math

import numpy as np
import pytest
import torch

import ssmkit.lti.modes as modes
from ssmkit.lti import (
    convolve,
    kernel,
    kernel_dense,
    kernel_sequential,
    kernel_vandermonde,
    krylov,
    recurrent,
    scan,
    scan_parallel,
    scan_sequential,
    scan_system,
)

LENGTHS = [1, 2, 7, 64, 1000]
STRUCTURES = ["dense_mimo", "dense_siso", "diag_mimo", "diag_siso"]


def random_system(structure: str, seed: int = 0):
    """A random stable discrete system (spectral radius 0.97) with batch dims: channels d = 2, batch b = 3.

    Returns (Ab, Bb, C, D, u_fn) where u_fn(l) makes an input of length l.
    """
    g = torch.Generator().manual_seed(seed)
    d, n, p, q, b = 2, 5, 2, 3, 3
    f64 = dict(generator=g, dtype=torch.float64)
    if structure.startswith("dense"):
        p, q = (2, 3) if structure == "dense_mimo" else (1, 1)
        M = torch.randn(d, n, n, **f64)  # (d, n, n)
        rho = torch.linalg.eigvals(M).abs().amax(-1)  # (d,)
        Ab = 0.97 * M / rho[:, None, None]  # (d, n, n)
    else:
        radius = 0.5 + 0.47 * torch.rand(d, n, **f64)  # (d, n)
        angle = math.pi * torch.rand(d, n, **f64)  # (d, n)
        Ab = torch.polar(radius, angle)  # (d, n) complex
    cplx = lambda *s: torch.complex(torch.randn(*s, **f64), torch.randn(*s, **f64))
    real = lambda *s: torch.randn(*s, **f64)
    if structure == "diag_siso":
        Bb, C, D = cplx(d, n), cplx(d, n), real(d)
        u_fn = lambda l: torch.randn(b, d, l, **f64)  # (b, d, l)
    elif structure == "diag_mimo":
        Bb, C, D = cplx(d, n, p), cplx(d, q, n), real(d, q, p)
        u_fn = lambda l: torch.randn(b, d, l, p, **f64)  # (b, d, l, p)
    else:
        Bb, C, D = real(d, n, p), real(d, q, n), real(d, q, p)
        u_fn = lambda l: torch.randn(b, d, l, p, **f64)  # (b, d, l, p)
    return Ab, Bb, C, D, u_fn


def loop_reference(structure, Ab, Bb, C, D, u, state=None):
    """x_k = Ā x_{k−1} + B̄ u_k, y_k = C x_k + D u_k in float64/complex128, one step at a time."""
    cd = torch.complex128
    Ab, Bb, C, D, u = (t.to(cd) for t in (Ab, Bb, C, D, u))
    siso = structure == "diag_siso"
    l = u.shape[-1] if siso else u.shape[-2]
    lead = u.shape[:-1] if siso else u.shape[:-2]
    n = Ab.shape[-1]
    x = torch.zeros(*lead, n, dtype=cd) if state is None else state.to(cd).expand(*lead, n).clone()
    ys = []
    for k in range(l):
        if siso:
            uk = u[..., k]  # (b, d)
            x = Ab * x + Bb * uk[..., None]
            ys.append((C * x).sum(-1) + D * uk)
        else:
            uk = u[..., k, :]  # (b, d, p)
            Ax = (Ab @ x[..., None])[..., 0] if structure.startswith("dense") else Ab * x
            x = Ax + (Bb @ uk[..., None])[..., 0]
            ys.append((C @ x[..., None])[..., 0] + (D @ uk[..., None])[..., 0])
    return torch.stack(ys, dim=-1 if siso else -2), x


def to_real_if_possible(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y if like.is_complex() else y.real


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("l", LENGTHS)
def test_three_modes_agree(l, structure, dtype):
    Ab, Bb, C, D, u_fn = random_system(structure, seed=l)
    u = u_fn(l)
    cast = {
        torch.float64: lambda t: t,
        torch.float32: lambda t: t.to(torch.complex64 if t.is_complex() else torch.float32),
    }[dtype]
    Ab, Bb, C, D, u = (cast(t) for t in (Ab, Bb, C, D, u))
    y_ref, x_ref = loop_reference(structure, Ab, Bb, C, D, u)  # float64 from the (possibly float32) inputs
    y_ref = to_real_if_possible(y_ref, C)
    x_ref = x_ref if (Ab.is_complex() or Bb.is_complex()) else x_ref.real
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    scale = float(y_ref.abs().max())

    def check(y, name):
        assert y.shape == y_ref.shape, name
        assert y.dtype.is_complex == y_ref.dtype.is_complex, name
        torch.testing.assert_close(y.to(y_ref.dtype), y_ref, rtol=tol, atol=tol * scale, msg=name)

    y_rec, x_rec = recurrent(Ab, Bb, C, D, u)
    check(y_rec, "recurrent")
    K = kernel(Ab, Bb, C, l)
    check(convolve(u, K, D), "convolve(kernel)")
    y_scan, x_scan = scan_system(Ab, Bb, C, D, u)
    check(y_scan, "scan")
    for x in (x_rec, x_scan):
        torch.testing.assert_close(x.to(x_ref.dtype), x_ref, rtol=tol, atol=tol * float(x_ref.abs().max()))
    assert y_rec.dtype.is_floating_point == (not Ab.is_complex() and not C.is_complex())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_initial_state(structure):
    Ab, Bb, C, D, u_fn = random_system(structure, seed=5)
    u = u_fn(9)
    state = torch.randn(Ab.shape[0], Ab.shape[-1], dtype=torch.float64).to(Ab.dtype)  # (d, n)
    y_ref, x_ref = loop_reference(structure, Ab, Bb, C, D, u, state)
    y_ref = to_real_if_possible(y_ref, C)
    for fn in (recurrent, scan_system):
        y, x = fn(Ab, Bb, C, D, u, state)
        torch.testing.assert_close(y.to(y_ref.dtype), y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x, x_ref if x.is_complex() else x_ref.real, rtol=1e-10, atol=1e-12)
    # Splitting the sequence and passing the state on gives the same output.
    y1, x1 = recurrent(Ab, Bb, C, D, u[..., :4] if structure == "diag_siso" else u[..., :4, :], state)
    y2, _ = recurrent(Ab, Bb, C, D, u[..., 4:] if structure == "diag_siso" else u[..., 4:, :], x1)
    torch.testing.assert_close(
        torch.cat([y1, y2], dim=-1 if structure == "diag_siso" else -2), y_ref.to(y1.dtype)
    )


# --- kernels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 3, 7, 64, 100])
def test_kernel_dense_equals_matrix_powers(length):
    Ab, Bb, C, _, _ = random_system("dense_mimo", seed=1)
    K = kernel(Ab, Bb, C, length)
    assert K.shape == (2, length, 3, 2)
    ref = [C @ torch.linalg.matrix_power(Ab, k) @ Bb for k in range(length)]
    if length:
        torch.testing.assert_close(K, torch.stack(ref, dim=1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(kernel_sequential(Ab, Bb, C, length), K, rtol=1e-10, atol=1e-12)
    X = krylov(Ab, Bb, length)  # (d, L, n, p)
    for k in range(length):
        torch.testing.assert_close(X[:, k], torch.linalg.matrix_power(Ab, k) @ Bb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("length", [1, 5, 64, 333])
def test_kernel_vandermonde_equals_dense(length):
    """Diagonal Ā through the Vandermonde path == the same system as a dense diag_embed(Ā) through Krylov."""
    Ab, Bb, C, _, _ = random_system("diag_mimo", seed=2)
    K_v = kernel_vandermonde(Ab, Bb, C, length)  # (d, L, q, p)
    K_d = kernel_dense(torch.diag_embed(Ab), Bb, C, length)  # (d, L, q, p)
    torch.testing.assert_close(K_v, K_d, rtol=1e-10, atol=1e-12)
    Ab, Bb, C, _, _ = random_system("diag_siso", seed=3)
    K_s = kernel(Ab, Bb, C, length)  # (d, L)
    ref = torch.stack([(C * Ab**k * Bb).sum(-1) for k in range(length)], dim=-1)
    torch.testing.assert_close(K_s, ref, rtol=1e-10, atol=1e-12)


# --- convolve ----------------------------------------------------------------------------------------------


def direct_conv(u: np.ndarray, K: np.ndarray) -> np.ndarray:
    """SISO y_k = Σ_{j<=k} K_j u_{k−j} along the last axis."""
    l = u.shape[-1]
    y = np.zeros(np.broadcast_shapes(u.shape[:-1], K.shape[:-1]) + (l,), dtype=np.result_type(u, K))
    for k in range(l):
        for j in range(min(k + 1, K.shape[-1])):
            y[..., k] += K[..., j] * u[..., k - j]
    return y


@pytest.mark.parametrize("l,L", [(1, 1), (10, 10), (10, 4), (4, 10), (37, 37)])
@pytest.mark.parametrize("complex_k", [False, True])
def test_convolve_siso_equals_direct_sum(l, L, complex_k):
    g = torch.Generator().manual_seed(l * 100 + L)
    u = torch.randn(3, 2, l, generator=g, dtype=torch.float64)
    K = torch.randn(2, L, generator=g, dtype=torch.float64)
    if complex_k:
        K = torch.complex(K, torch.randn(2, L, generator=g, dtype=torch.float64))
    D = torch.randn(2, generator=g, dtype=torch.float64)
    y = convolve(u, K, D)
    ref = direct_conv(u.numpy(), K.numpy()) + D.numpy()[:, None] * u.numpy()
    torch.testing.assert_close(y, torch.from_numpy(ref), rtol=1e-10, atol=1e-12)


def test_convolve_mimo_equals_direct_sum():
    g = torch.Generator().manual_seed(7)
    l, L, p, q = 20, 15, 2, 3
    u = torch.randn(4, l, p, generator=g, dtype=torch.float64)
    K = torch.randn(L, q, p, generator=g, dtype=torch.float64)
    y = convolve(u, K)
    ref = torch.zeros(4, l, q, dtype=torch.float64)
    for k in range(l):
        for j in range(min(k + 1, L)):
            ref[:, k] += (K[j] @ u[:, k - j, :, None])[..., 0]
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


# --- scan --------------------------------------------------------------------------------------------------


def scan_loop(a, b, state=None, matrix=False):
    h = torch.zeros_like(b[..., 0, :]) if state is None else state.expand_as(b[..., 0, :]).clone()
    hs = []
    for t in range(b.shape[-2]):
        at = a[..., t, :, :] if matrix else a[..., t, :]
        h = ((at @ h[..., None])[..., 0] if matrix else at * h) + b[..., t, :]
        hs.append(h)
    return torch.stack(hs, dim=-2)


@pytest.mark.parametrize("l", [1, 2, 3, 7, 8, 64, 1000])
@pytest.mark.parametrize("matrix", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_equals_loop(l, matrix, with_state):
    g = torch.Generator().manual_seed(l)
    n = 3
    b = torch.randn(2, l, n, generator=g, dtype=torch.float64)
    if matrix:
        a = torch.randn(2, l, n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    else:
        a = torch.rand(2, l, n, generator=g, dtype=torch.float64) * 1.8 - 0.9
    state = torch.randn(2, n, generator=g, dtype=torch.float64) if with_state else None
    ref = scan_loop(a, b, state, matrix)
    scale = float(ref.abs().max())
    torch.testing.assert_close(scan_parallel(a, b, state), ref, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(scan_sequential(a, b, state), ref, rtol=1e-10, atol=1e-12 * scale)
    assert scan is scan_parallel


def test_scan_float32_and_complex():
    g = torch.Generator().manual_seed(0)
    l, n = 500, 4
    a = torch.polar(
        0.9 + 0.09 * torch.rand(l, n, generator=g, dtype=torch.float64), torch.rand(l, n, dtype=torch.float64)
    )
    b = torch.complex(torch.randn(l, n, dtype=torch.float64), torch.randn(l, n, dtype=torch.float64))
    ref = scan_loop(a, b)
    torch.testing.assert_close(scan(a, b), ref, rtol=1e-10, atol=1e-12)
    h32 = scan(a.to(torch.complex64), b.to(torch.complex64))
    assert h32.dtype == torch.complex64
    torch.testing.assert_close(h32.to(torch.complex128), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_scan_takes_log_depth():
    """O(log l) sequential steps: the parallel scan makes 2 vectorised combine calls per tree level."""
    calls = {"n": 0}
    original = modes._combine

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    modes._combine = counting
    try:
        for l in (1000, 4096):
            calls["n"] = 0
            scan_parallel(torch.rand(l, 2, dtype=torch.float64), torch.randn(l, 2, dtype=torch.float64))
            assert calls["n"] <= 2 * math.ceil(math.log2(l)), (l, calls["n"])
    finally:
        modes._combine = original


@pytest.mark.parametrize("matrix", [False, True])
def test_scan_gradients(matrix):
    g = torch.Generator().manual_seed(1)
    l, n = 7, 2
    shape_a = (l, n, n) if matrix else (l, n)
    a = (torch.randn(*shape_a, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(l, n, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: scan_parallel(a, b, s), (a, b, s))
    # Longer sequence: gradients equal those of the sequential loop.
    l = 300
    a = (
        torch.randn(l, *shape_a[1:], generator=g, dtype=torch.float64) * (0.5 if matrix else 0.9)
    ).requires_grad_()
    b = torch.randn(l, n, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(l, n, generator=g, dtype=torch.float64)
    grads = []
    for fn in (scan_parallel, lambda a, b: scan_loop(a, b, matrix=matrix)):
        ga, gb = torch.autograd.grad((fn(a, b) * w).sum(), (a, b))
        grads.append((ga, gb))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
