"""The reference selective scan against an independent float64 loop, gradcheck, state passing, bad input.

The independent loop below is written from the paper's recurrence (Gu & Dao 2023, Algorithm 2) with
NumPy scalars per (batch, channel, state) — it shares no code with ``ssmkit.scan``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scan_cases import ALL_OPTIONS, ScanCase, make_inputs

from ssmkit.scan import selective_scan
from ssmkit.scan.reference import selective_scan_reference


def loop_float64(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """out[b, i, t] and h_l[b, i, :] by the textbook recurrence, one channel at a time, in float64."""
    u, delta, A = (np.asarray(x.detach().double()) for x in (u, delta, A))
    Bn, Cn = np.asarray(B.detach().double()), np.asarray(C.detach().double())
    nb, d, l = u.shape
    n = A.shape[1]

    def coeff(M, bi, i, t):  # the (n,) vector B_t or C_t of channel i
        if M.ndim == 2:
            return M[i]
        if M.ndim == 3:
            return M[bi, :, t]
        per_group = d // M.shape[1]
        return M[bi, i // per_group, :, t]

    out = np.zeros((nb, d, l))
    last = np.zeros((nb, d, n))
    for bi in range(nb):
        for i in range(d):
            h = np.zeros(n) if initial_state is None else np.asarray(initial_state[bi, i].detach().double())
            for t in range(l):
                dt = delta[bi, i, t] + (0.0 if delta_bias is None else float(delta_bias[i]))
                if delta_softplus:
                    dt = math.log1p(math.exp(dt)) if dt <= 20 else dt
                h = np.exp(dt * A[i]) * h + dt * u[bi, i, t] * coeff(Bn, bi, i, t)
                y = float(np.dot(coeff(Cn, bi, i, t), h))
                if D is not None:
                    y += float(D[i]) * u[bi, i, t]
                if z is not None:
                    zz = float(z[bi, i, t])
                    y *= zz / (1.0 + math.exp(-zz))
                out[bi, i, t] = y
            last[bi, i] = h
    return torch.from_numpy(out), torch.from_numpy(last)


LOOP_CASES = [
    ScanCase(b=1, d=1, n=1, l=1),
    ScanCase(b=2, d=3, n=4, l=11, **ALL_OPTIONS),
    ScanCase(b=2, d=4, n=2, l=6, B_layout="grouped", C_layout="grouped", groups=2, D=True),
    ScanCase(b=1, d=4, n=3, l=8, B_layout="invariant", C_layout="variable", z=True, initial_state=True),
    ScanCase(b=2, d=6, n=2, l=5, B_layout="variable", C_layout="invariant", softplus=True, delta_bias=True),
    ScanCase(b=2, d=6, n=3, l=7, B_layout="grouped", C_layout="invariant", groups=3, **ALL_OPTIONS),
]


@pytest.mark.parametrize("case", LOOP_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_reference_matches_independent_loop(case, dtype):
    args = make_inputs(case, dtype=dtype)
    out, last = selective_scan_reference(*args.positional())
    exp_out, exp_last = loop_float64(*args.positional())
    assert out.dtype == dtype and last.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), exp_out, rtol=tol, atol=tol)
    torch.testing.assert_close(last.double(), exp_last, rtol=tol, atol=tol)


def test_softplus_large_delta_is_identity():
    """softplus(Δ) = Δ for Δ > 20 (mamba-ssm's threshold), checked against the loop's exact branch."""
    case = ScanCase(b=1, d=2, n=2, l=4, softplus=True)
    args = make_inputs(case, dtype=torch.float64)
    args.delta = args.delta + 25.0  # Δ ≈ 25: the state forgets everything each step
    out, _ = selective_scan_reference(*args.positional())
    torch.testing.assert_close(out, loop_float64(*args.positional())[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    [
        ScanCase(b=2, d=4, n=2, l=5, B_layout="grouped", C_layout="invariant", groups=2, **ALL_OPTIONS),
        ScanCase(b=1, d=3, n=3, l=4, B_layout="invariant", C_layout="variable", **ALL_OPTIONS),
    ],
    ids=str,
)
def test_reference_gradcheck_float64(case):
    """Gradients of out AND last_state w.r.t. every input, including initial_state."""
    args = make_inputs(case, dtype=torch.float64, requires_grad=True)
    names = list(args.tensors())

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        a = args.to()  # structure only; tensors replaced below
        for k, v in kw.items():
            setattr(a, k, v)
        return selective_scan_reference(*a.positional())  # (out, last_state): both are checked

    assert torch.autograd.gradcheck(fn, tuple(args.tensors().values()), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("split", [1, 6, 13])
def test_state_passing_equals_one_scan(backend, split):
    """Scanning [x1, x2] equals scanning x1, then x2 from the returned state (values and gradients)."""
    case = ScanCase(b=2, d=5, n=3, l=19, B_layout="variable", C_layout="variable", **ALL_OPTIONS)
    args = make_inputs(case, dtype=torch.float64, requires_grad=True)
    kw = dict(
        D=args.D, delta_bias=args.delta_bias, delta_softplus=True, return_last_state=True, backend=backend
    )
    full, last = selective_scan(
        args.u, args.delta, args.A, args.B, args.C, z=args.z, initial_state=args.initial_state, **kw
    )

    def part(sl, state):
        return selective_scan(
            args.u[..., sl], args.delta[..., sl], args.A, args.B[..., sl], args.C[..., sl],
            z=args.z[..., sl], initial_state=state, **kw,
        )  # fmt: skip

    y1, s1 = part(slice(0, split), args.initial_state)
    y2, s2 = part(slice(split, None), s1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, last, rtol=1e-12, atol=1e-12)
    # the state passed between the two calls carries gradient: same gradients as the single scan
    w, v = torch.randn_like(full), torch.randn_like(last)
    g_full = torch.autograd.grad((full * w).sum() + (last * v).sum(), [args.u, args.A, args.initial_state])
    g_split = torch.autograd.grad(
        (torch.cat([y1, y2], -1) * w).sum() + (s2 * v).sum(), [args.u, args.A, args.initial_state]
    )
    for a, e in zip(g_split, g_full):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_return_types_and_dtypes():
    args = make_inputs(ScanCase(b=1, d=2, n=3, l=4), dtype=torch.bfloat16)
    out, last = selective_scan(*args.positional()[:5], return_last_state=True, backend="reference")
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 4)
    assert last.dtype == torch.float32 and last.shape == (1, 2, 3)
    only = selective_scan(*args.positional()[:5], backend="reference")
    assert isinstance(only, torch.Tensor)
    torch.testing.assert_close(only, out, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input
b, d, n, l = 2, 3, 4, 5


def good():
    return dict(
        u=torch.randn(b, d, l),
        delta=torch.rand(b, d, l),
        A=-torch.rand(d, n),
        B=torch.randn(b, n, l),
        C=torch.randn(b, n, l),
    )


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("delta", torch.rand(b, d, l + 1), (b, d, l)),
        ("A", torch.rand(d + 1, n), (d, "n")),
        ("B", torch.randn(b, n + 1, l), (b, n, l)),
        ("C", torch.randn(b, n, l - 1), (b, n, l)),
        ("B", torch.randn(d, n + 1), (d, n)),
        ("C", torch.randn(b, 2, n, l), (b, "g", n, l)),  # 2 groups do not divide d = 3
        ("B", torch.randn(n, l), (d, n)),
        ("D", torch.randn(d + 2), (d,)),
        ("z", torch.randn(b, d, l, 1), (b, d, l)),
        ("delta_bias", torch.randn(1, d), (d,)),
        ("initial_state", torch.randn(b, d, n + 1), (b, d, n)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_shapes_name_argument_and_both_shapes(name, value, expected):
    kw = good()
    kw[name] = value
    with pytest.raises(ValueError) as info:
        selective_scan(**kw, backend="reference")
    msg = str(info.value)
    assert msg.startswith(name + " "), msg
    assert str(tuple(value.shape)) in msg, msg  # the received shape
    for part in expected:  # the expected shape, numerically where it is determined
        assert str(part) in msg, msg


def test_bad_u_dtype_and_device_and_type():
    kw = good()
    kw["u"] = torch.ones(b, d, l, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"u must be a real floating-point tensor, got dtype torch.int64"):
        selective_scan(**kw)
    kw = good()
    kw["u"] = torch.randn(b, d)
    with pytest.raises(ValueError, match=r"u must be a 3-d tensor \(b, d, l\), got \(2, 3\)"):
        selective_scan(**kw)
    kw = good()
    kw["A"] = torch.complex(kw["A"], kw["A"])
    with pytest.raises(
        ValueError, match=r"A must be a real floating-point tensor, got dtype torch.complex64"
    ):
        selective_scan(**kw)
    kw = good()
    kw["C"] = kw["C"].numpy()
    with pytest.raises(TypeError, match=r"C must be a torch.Tensor, got ndarray"):
        selective_scan(**kw)
    kw = good()
    kw["D"] = torch.randn(d, device="meta")
    with pytest.raises(ValueError, match=r"D must be on u's device cpu, got meta"):
        selective_scan(**kw)


def test_bad_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        selective_scan(**good(), backend="fast")
