"""NaN/±inf and empty sizes are part of the ``selective_scan`` contract: every backend (``chunked``, ``cpu``
and ``auto``) gives what the ``reference`` loop gives — the same NaN, +inf and -inf positions in the
output, the last state and every gradient, and finite values close to the reference's.

The property test draws a small problem (sizes across the kernel's 16-lane blocks and its 64-step chunks,
every option and B/C layout), plants NaN / +inf / -inf at random positions of random inputs, and compares.
The regression tests are the concrete cases that were wrong: the fused kernel masked a NaN in Δ under
softplus, gave ±inf where the reference gives NaN, and d = 0 killed the interpreter (SIGFPE); n = 0 was
a raw kernel error and b = 0 a crash of ``chunked``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scan_cases import LAYOUTS, ScanCase, make_inputs, run_with_grads

import ssmkit.scan as scan
from ssmkit.scan.chunked import selective_scan_chunked
from ssmkit.scan.reference import selective_scan_reference

KERNEL_REASON = scan._cpu_unavailable_reason()
needs_kernel = pytest.mark.skipif(KERNEL_REASON is not None, reason=f"fused CPU kernel: {KERNEL_REASON}")


def _backend(name: str):
    """A backend as a function of the positional scan arguments, returning (out, last_state)."""
    if name == "chunked_small":  # several chunks and blocks even for short l: the carry pass runs
        return lambda *a: selective_scan_chunked(*a, chunk_size=4, chunks_per_block=2)

    def fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        return scan.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state, backend=name
        )

    return fn


BACKENDS = ["chunked", "chunked_small", "cpu", "auto"]


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-3):
    """Same shape, NaN/+inf/-inf at the same positions, finite values close (relative to the largest)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = test(a) != test(e)
        assert not bad.any(), (
            f"{what}: {kind} differs at {bad.nonzero()[:5].tolist()} "
            f"(got {a[bad][:5].tolist()}, reference {e[bad][:5].tolist()})"
        )
    fin = torch.isfinite(e)
    if fin.any():
        scale = max(e[fin].abs().max().item(), 1.0)
        torch.testing.assert_close(a[fin], e[fin], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def compare(name: str, args) -> None:
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_reference, args.to(requires_grad=True))
    out, last, grads = run_with_grads(_backend(name), args.to(requires_grad=True))
    assert_same_nonfinite(out, ref_out, f"{name} out")
    assert_same_nonfinite(last, ref_last, f"{name} last_state")
    for k, g in ref_grads.items():
        assert grads[k] is not None, f"{name}: no gradient for {k}"
        assert_same_nonfinite(grads[k], g, f"{name} grad {k}")


@st.composite
def poisoned_inputs(draw):
    """A small random problem with 1-3 NaN/±inf planted in its inputs."""
    d = draw(st.sampled_from([1, 3, 16, 20]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if d % g == 0]))
    case = ScanCase(
        b=draw(st.integers(1, 2)),
        d=d,
        n=draw(st.sampled_from([1, 3, 4, 16])),
        l=draw(st.sampled_from([1, 5, 63, 64, 70])),
        D=draw(st.booleans()),
        z=draw(st.booleans()),
        delta_bias=draw(st.booleans()),
        softplus=draw(st.booleans()),
        B_layout=draw(st.sampled_from(LAYOUTS)),
        C_layout=draw(st.sampled_from(LAYOUTS)),
        groups=groups,
        initial_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    args = make_inputs(case)
    present = sorted(args.tensors())
    for _ in range(draw(st.integers(1, 3))):
        t = args.tensors()[draw(st.sampled_from(present))]
        flat = t.detach().view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
    return case, args


@needs_kernel
@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=poisoned_inputs())
def test_nonfinite_inputs_propagate_as_in_the_reference(name, problem):
    _, args = problem
    compare(name, args)


def _case_args(**kw):
    return make_inputs(ScanCase(**{"b": 1, "d": 16, "n": 4, "l": 8, **kw}))


@needs_kernel
@pytest.mark.parametrize("name", BACKENDS)
def test_nan_in_delta_under_softplus_is_not_masked(name):
    args = _case_args(softplus=True, delta_bias=True, D=True, z=True)
    args.delta.detach()[0, 3, 2] = float("nan")
    compare(name, args)
    out, _ = _backend(name)(*args.positional())
    assert out[0, 3, 2:].isnan().all() and out[0, 3, :2].isfinite().all()


@needs_kernel
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("z_value", [float("inf"), -float("inf")])
def test_infinite_gate_gives_what_the_reference_gives(name, z_value):
    args = _case_args(z=True, D=True)
    args.z.detach()[0, 5, 4] = z_value
    compare(name, args)
    if z_value < 0:  # SiLU(-inf) = -inf · 0 = NaN in the reference (PyTorch's silu)
        out, _ = _backend(name)(*args.positional())
        assert out[0, 5, 4].isnan()


@needs_kernel
@pytest.mark.parametrize("name", BACKENDS)
def test_large_positive_A_overflows_as_in_the_reference(name):
    args = _case_args(D=True)
    args.A.detach()[7] = 60.0  # Δ·A up to ~36 per step: exp overflows float32 after a few steps
    args.delta.detach()[0, 7] = 1.5
    compare(name, args)
    ref, _ = selective_scan_reference(*args.positional())
    assert not ref[0, 7].isfinite().all()  # the case does reach the non-finite range


@needs_kernel
@pytest.mark.parametrize("name", BACKENDS)
def test_infinite_u_without_D_adds_no_D_term(name):
    args = _case_args()
    args.u.detach()[0, 2, 3] = float("inf")
    compare(name, args)


# ---- empty sizes ------------------------------------------------------------------------------------

EMPTY = [dict(b=0), dict(d=0), dict(n=0), dict(l=0), dict(b=0, d=0, n=0, l=0)]


@needs_kernel
@pytest.mark.parametrize("sizes", EMPTY, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("name", ["reference", *BACKENDS])
def test_empty_sizes_give_the_reference_result_on_every_backend(name, sizes):
    case = ScanCase(**{"b": 2, "d": 4, "n": 3, "l": 5, "D": True, "z": True, "initial_state": True, **sizes})
    args = make_inputs(case)
    b, d, n, l = case.b, case.d, case.n, case.l
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_reference, args.to(requires_grad=True))
    out, last, grads = run_with_grads(_backend(name), args.to(requires_grad=True))
    assert out.shape == (b, d, l) and last.shape == (b, d, n)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last, ref_last, rtol=1e-6, atol=1e-6)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"grad {k}: {m}")
    if n == 0 and min(b, d, l) > 0:  # no state: out = D u · SiLU(z), exactly
        expected = (args.D[:, None] * args.u * torch.nn.functional.silu(args.z)).detach()
        torch.testing.assert_close(out, expected)


@needs_kernel
def test_d_zero_on_the_fused_kernel_does_not_kill_the_interpreter():
    """d = 0 used to raise SIGFPE inside the kernel (a division by d); run it in a child to see it."""
    code = textwrap.dedent(
        """
        import torch
        from ssmkit.scan import selective_scan
        out, last = selective_scan(torch.zeros(2, 0, 5), torch.zeros(2, 0, 5), torch.zeros(0, 3),
                                   torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), return_last_state=True,
                                   backend="cpu")
        print(tuple(out.shape), tuple(last.shape))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert done.stdout.strip() == "(2, 0, 5) (2, 0, 3)"
