"""S4 (DPLR, bilinear, Cauchy + Woodbury kernel, O(n) Woodbury step): kernel vs brute-force powers of the
full discretised matrix (numpy, float64) and vs ``lti.kernel``; vs the real HiPPO-LegS system
discretised by scipy; length doubling of C̃; the DPLR step vs the dense recurrence (``lti.recurrent``);
one forward == chunked forwards == a loop of step (the state protocol); gradients; empty dims."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import cont2discrete

from ssmkit.layers.s4 import S4, conj_complete
from ssmkit.layers.s4d import LTIState, complex_dtype
from ssmkit.lti import kernel, recurrent

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


def perturb(layer: torch.nn.Module, scale: float = 0.05, seed: int = 7) -> None:
    """Move every parameter off its initialisation (parity tests must not rely on init structure)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def steps(layer, x: torch.Tensor, state: LTIState) -> torch.Tensor:
    """A loop of ``step`` over (b, l, d) -> (b, l, d); ``state`` ends after the last input."""
    return torch.stack([layer.step(x[:, t], state) for t in range(x.shape[1])], 1)


def dense_reference(layer: S4, x: torch.Tensor, h0: torch.Tensor):
    """The slow twin: ``lti.recurrent`` on the dense Ā (d, n, n), B̄ and the true C, over the completed
    n states -> (y (b, l, d), h_last (b, d, n/2))."""
    with torch.no_grad():
        Ab, Bb = layer.dense()  # (d, n, n), (d, n)
        C = conj_complete(layer.true_C())  # (d, n)
        D = layer.D.to(Ab.dtype)  # (d,)
        u = x.transpose(1, 2).to(Ab.dtype)[..., None]  # (b, d, l, 1)
        y, last = recurrent(Ab, Bb[..., None], C[:, None, :], D[:, None, None], u, conj_complete(h0))
    return y[..., 0].real.transpose(1, 2), last[..., : h0.shape[-1]]  # (b, l, d), (b, d, n/2)


@pytest.mark.parametrize("tuned", [False, True])
@pytest.mark.parametrize("d_state", [2, 8, 64])
def test_dplr_step_equals_dense_step(tuned, d_state):
    """The O(n) Woodbury step == the dense N×N recurrence (lti.recurrent), float64, 1e-12."""
    torch.manual_seed(8)
    layer = S4(3, d_state, dtype=torch.float64)
    perturb(layer)
    if tuned:
        layer.kernel(16)  # C now holds C̃: step must recover the true C
    x = torch.randn(2, 11, 3, dtype=torch.float64)
    h0 = 0.3 * torch.randn(2, 3, d_state // 2, dtype=torch.complex128)
    y_ref, h_ref = dense_reference(layer, x, h0)
    state = LTIState(h0.clone())
    with torch.no_grad():
        y = steps(layer, x, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.h, h_ref, rtol=1e-12, atol=1e-12)


def test_step_never_builds_the_dense_matrix(monkeypatch):
    """With C untuned (or its true C cached), a step — or a one-token forward with a state — touches only
    n-vectors: no dense A, no solve."""
    import ssmkit.layers.s4 as s4

    untuned, tuned = S4(2, 8, dtype=torch.float64), S4(2, 8, dtype=torch.float64)
    tuned.kernel(32)
    states = untuned.new_state(1), tuned.new_state(1)
    x = torch.randn(1, 2, dtype=torch.float64)
    with torch.no_grad():
        tuned.step(x, states[1])  # the one solve for the true C, then cached

    def forbidden(*args, **kwargs):
        raise AssertionError("step built a dense matrix")

    monkeypatch.setattr(s4, "dplr_dense", forbidden)
    monkeypatch.setattr(s4, "discretize_dense", forbidden)
    monkeypatch.setattr(torch.linalg, "solve", forbidden)
    with torch.no_grad():
        for _ in range(3):
            for layer, state in zip((untuned, tuned), states):
                layer.step(x, state)
                layer(x[:, None], state)  # one-token forward with a state = the step


def test_kernel_cauchy_equals_lti_kernel_on_the_dense_system():
    """The Cauchy/Woodbury kernel against its slow twin, ``lti.kernel`` (Krylov by repeated squaring) on
    the dense Ā, B̄ and true C."""
    torch.manual_seed(9)
    layer = S4(3, 16, dtype=torch.float64)
    perturb(layer)
    K = layer.kernel(50)  # (d, 50)
    with torch.no_grad():
        Ab, Bb = layer.dense()
        C = conj_complete(layer.true_C())
        K_ref = kernel(Ab, Bb[..., None], C[:, None, :], 50)[..., 0, 0].real  # (d, 50)
    torch.testing.assert_close(K, K_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("first", ["forward", "step"])
def test_forward_chunks_and_steps_agree(dtype, tol, first):
    """One forward == chunked forwards with one state == a loop of step == the dense reference, outputs
    and final state, from a non-zero state; whether C̃ was tuned before or after the steps."""
    torch.manual_seed(4)
    layer = S4(3, 16, dtype=dtype)
    perturb(layer)
    x = torch.randn(2, 29, 3, dtype=dtype)
    h0 = 0.3 * torch.randn(2, 3, 8, dtype=complex_dtype(dtype))
    with torch.no_grad():
        stepped = LTIState(h0.clone())
        if first == "forward":
            full = LTIState(h0.clone())
            y = layer(x, full)
        y_steps = steps(layer, x, stepped)
        if first == "step":
            full = LTIState(h0.clone())
            y = layer(x, full)
        chunked = LTIState(h0.clone())
        y_chunks = torch.cat([layer(x[:, a:e], chunked) for a, e in [(0, 1), (1, 12), (12, 12), (12, 29)]], 1)
    y_ref, h_ref = dense_reference(layer, x.double() if dtype == torch.float64 else x, h0)
    for out, st in [(y, full), (y_chunks, chunked), (y_steps, stepped)]:
        assert out.dtype == dtype and st.h.dtype == complex_dtype(dtype)
        torch.testing.assert_close(out, y_ref.to(dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(st.h, h_ref.to(st.h.dtype), rtol=tol, atol=tol)


def test_state_is_replaced_not_modified_and_carries_gradient():
    torch.manual_seed(5)
    layer = S4(3, 8)
    x = torch.randn(2, 10, 3)
    h0 = torch.randn(2, 3, 4, dtype=torch.complex64, requires_grad=True)
    state = LTIState(h0)
    y = layer(x[:, :6], state)
    h_mid = state.h
    assert h_mid is not h0 and h_mid.grad_fn is not None
    y2 = layer.step(x[:, 6], state)
    assert state.h is not h_mid
    (y.square().sum() + y2.square().sum() + state.h.abs().square().sum()).backward()
    assert h0.grad is not None and h0.grad.abs().sum() > 0


def test_gradients_reach_every_parameter():
    torch.manual_seed(6)
    layer = S4(3, 8)
    x = torch.randn(2, 20, 3)
    state = LTIState(torch.randn(2, 3, 4, dtype=torch.complex64))
    y = layer(x, state)
    (y.square().sum() + state.h.abs().square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # the step path is differentiable too
    layer.zero_grad()
    state.h = state.h.detach()
    y_t = layer.step(x[:, 0], state)
    (y_t.square().sum() + state.h.abs().square().sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_ssm_parameters_are_tagged_and_bad_arguments():
    layer = S4(2, 4)
    tagged = {n for n, p in layer.named_parameters() if hasattr(p, "_ssm_optim")}
    assert tagged == {"log_dt", "Lambda_log_re", "Lambda_im", "P", "B"}
    with pytest.raises(ValueError, match="d_state"):
        S4(2, 3)
    with pytest.raises(ValueError, match=r"\(b, l, d=2\)"):
        layer(torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="x_t"):
        layer.step(torch.randn(1, 3), layer.new_state(1))
    with pytest.raises(ValueError, match="state must be an LTIState"):
        layer(torch.randn(1, 5, 2), torch.zeros(1, 2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        layer(torch.ones(1, 5, 2, dtype=torch.int64))


@pytest.mark.parametrize("b,l", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_length_gives_empty_output_and_keeps_the_state(b, l):
    layer = S4(3, 8, dtype=torch.float64)
    x = torch.randn(b, l, 3, dtype=torch.float64)
    assert layer(x).shape == (b, l, 3)
    state = layer.new_state(b)
    state.h = torch.randn(b, 3, 4, dtype=torch.complex128)
    before = state.h
    y = layer(x, state)
    assert y.shape == (b, l, 3) and y.dtype == torch.float64 and state.h is before
    if b == 0:
        assert layer.step(torch.zeros(0, 3, dtype=torch.float64), state).shape == (0, 3)


def test_demo_section_writes_the_kernel_plot(tmp_path):
    from ssmkit.demo.s4 import init_kernels, run

    kernels = init_kernels(length=64, d_state=16)
    assert set(kernels) == {"S4D-Lin", "S4D-Inv", "S4D-LegS", "S4 (DPLR LegS)"}
    for K in kernels.values():
        assert K.shape == (3, 64) and torch.isfinite(K).all() and K.abs().max() > 0
    (path,) = run(tmp_path)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
