"""The fused C++ ``cpu`` selective scan against the sequential reference, outputs and every gradient.

Oracle: ``selective_scan_reference`` run in float64 on the same values (an independent, exact loop
differentiated by autograd). Tolerances (relative to the norm of the expected tensor):
    float32 forward (out, last_state)  ≤ 1e-5
    float32 gradients                  ≤ 1e-4   (plus an element-wise check, rtol 1e-3 / atol 1e-3·max)
    bfloat16/float16 inputs: out and gradients are rounded to that dtype (≤ 2^-8 relative per element),
                     so ≤ 1e-2;
                     last_state stays float32, ≤ 1e-5.
Every test skips, with the reason, only when the extension cannot be built here.
"""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.scan import cpu
from ssmkit.scan.reference import selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture(scope="module")
def chunk() -> int:
    reason = cpu.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return cpu.chunk_size()


def make_inputs(b, d, l, n, *, bc=("var", "var"), g=(1, 1), D=True, z=True, bias=True, h0=True, seed=0):
    """Random float64 inputs; bc[i] ∈ {"var", "grp", "ti"} for B and C, g = their group counts."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731

    def bc_tensor(kind, groups):
        if kind == "var":
            return r(b, n, l)  # (b, n, l)
        if kind == "grp":
            return r(b, groups, n, l)  # (b, g, n, l)
        return r(d, n)  # (d, n)

    x = {
        "u": r(b, d, l),  # (b, d, l)
        "delta": 0.5 * r(b, d, l) - 1.0,  # (b, d, l): softplus(·) ≈ 0.05 … 1.5
        "A": -torch.exp(0.5 * r(d, n)),  # (d, n), negative
        "B": bc_tensor(bc[0], g[0]),
        "C": bc_tensor(bc[1], g[1]),
        "D": r(d) if D else None,  # (d,)
        "z": r(b, d, l) if z else None,  # (b, d, l)
        "delta_bias": 0.3 * r(d) if bias else None,  # (d,)
        "initial_state": r(b, d, n) if h0 else None,  # (b, d, n)
    }
    return x


def run(fn, x, dtype, softplus, dout, dlast):
    """Forward + backward of one backend; returns (out, last, {name: grad})."""
    leaves = {k: (None if v is None else v.detach().to(dtype).requires_grad_()) for k, v in x.items()}
    out, last = fn(*(leaves[k] for k in NAMES[:8]), softplus, leaves["initial_state"])
    loss = (out.double() * dout).sum() + ((last.double() * dlast).sum() if dlast is not None else 0.0)
    loss.backward()
    return out, last, {k: v.grad for k, v in leaves.items() if v is not None}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    den = expected.norm().item()
    num = (actual - expected).norm().item()
    return num / den if den > 0 else num


def check(name, actual, expected, tol, elementwise=True):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"
    if elementwise:
        scale = expected.abs().max().item()
        torch.testing.assert_close(
            actual.double(),
            expected.double(),
            rtol=1e-3,
            atol=1e-3 * scale + 1e-12,
            msg=lambda m: f"{name}: {m}",
        )


def compare(x, softplus=True, last_grad=True, dtype=torch.float32, fwd_tol=1e-5, grad_tol=1e-4):
    b, d, l = x["u"].shape
    n = x["A"].shape[1]
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(b, d, l, generator=gen, dtype=torch.float64)
    dlast = torch.randn(b, d, n, generator=gen, dtype=torch.float64) if last_grad else None
    out, last, grads = run(cpu.selective_scan_cpu, x, dtype, softplus, dout, dlast)
    # the oracle sees exactly the values the kernel saw (after rounding to `dtype`)
    x_seen = {k: (None if v is None else v.to(dtype).double()) for k, v in x.items()}
    out_r, last_r, grads_r = run(selective_scan_reference, x_seen, torch.float64, softplus, dout, dlast)
    assert out.dtype == dtype and last.dtype == torch.float32
    check("out", out, out_r, fwd_tol, elementwise=dtype == torch.float32)
    check("last_state", last, last_r, 1e-5)
    for k, g in grads_r.items():
        assert grads[k].dtype == x_seen[k].to(dtype).dtype, f"grad of {k} has dtype {grads[k].dtype}"
        check(f"grad {k}", grads[k], g, grad_tol, elementwise=dtype == torch.float32)


# (b, d, n, l, B/C layouts, groups, options) — a covering set, not the cartesian product; l is given as
# an offset from the chunk (None = literal) so l = chunk − 1, chunk, chunk + 1 exercise the boundary.
CASES = [
    # b, d, n, (l, rel_to_chunk), bc, g, D, z, bias, h0, softplus, last_grad
    (1, 1, 1, (1, False), ("var", "var"), (1, 1), True, True, True, True, True, True),
    (3, 17, 4, (7, False), ("var", "var"), (1, 1), True, True, True, False, True, False),
    (1, 64, 16, (-1, True), ("grp", "grp"), (4, 4), False, True, True, True, True, True),
    (3, 17, 16, (0, True), ("ti", "var"), (1, 1), True, False, True, True, True, True),
    (1, 64, 4, (1, True), ("var", "ti"), (1, 1), False, False, False, False, False, True),
    (3, 64, 16, (1000, False), ("var", "var"), (1, 1), True, True, True, True, True, True),
    (1, 17, 1, (1000, False), ("ti", "ti"), (1, 1), True, True, False, True, False, True),
    (1, 17, 4, (1, True), ("grp", "grp"), (17, 17), True, True, True, True, True, True),  # 1 channel/group
    (3, 64, 5, (2, True), ("grp", "grp"), (2, 8), True, True, True, True, True, True),  # mixed groups
    (1, 48, 16, (3, True), ("grp", "var"), (3, 1), True, True, True, False, True, False),  # 16 per group
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-d{c[1]}-n{c[2]}-{c[4][0]}{c[4][1]}")
def test_matches_reference_float32(chunk, case):
    b, d, n, (lv, rel), bc, g, D, z, bias, h0, softplus, last_grad = case
    l = chunk + lv if rel else lv
    x = make_inputs(b, d, l, n, bc=bc, g=g, D=D, z=z, bias=bias, h0=h0)
    if not softplus:  # Δ is used as given: keep it positive (a negative Δ makes the scan blow up)
        x["delta"] = torch.nn.functional.softplus(x["delta"])
    compare(x, softplus=softplus, last_grad=last_grad)


def test_two_threads_match_reference(chunk):
    """Work items are handed out dynamically and dB/dC partial sums reduced across them: same result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = make_inputs(2, 40, 3 * chunk + 1, 16, bc=("grp", "var"), g=(2, 1))
        compare(x)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(chunk, dtype):
    """bf16/fp16 inputs, float32 state: out and grads carry the input dtype's rounding (≤ 2^-8 each)."""
    x = make_inputs(2, 33, chunk + 5, 16, bc=("var", "var"))
    compare(x, dtype=dtype, fwd_tol=1e-2, grad_tol=1e-2)


def test_length_zero(chunk):
    x = make_inputs(2, 5, 0, 4)
    out, last = cpu.selective_scan_cpu(
        *(x[k].float() if x[k] is not None else None for k in NAMES[:8]), True, x["initial_state"].float()
    )
    assert out.shape == (2, 5, 0)
    torch.testing.assert_close(last, x["initial_state"].float(), rtol=0, atol=0)


def test_public_entry_point_and_long_memory(chunk):
    """Through ``ssmkit.selective_scan``; tiny Δ so the state remembers across many chunks."""
    import ssmkit.scan as scan

    x = make_inputs(1, 20, 4 * chunk + 3, 16)
    x["delta"] = x["delta"] - 5.0  # softplus(Δ) ≈ 0.005: slow decay, errors would accumulate
    args = {k: (None if v is None else v.float()) for k, v in x.items()}
    out, last = scan.selective_scan(**args, delta_softplus=True, return_last_state=True, backend="cpu")
    out_r, last_r = selective_scan_reference(*(x[k] for k in NAMES[:8]), True, x["initial_state"])
    check("out", out, out_r, 1e-5)
    check("last_state", last, last_r, 1e-5)


def test_no_b_d_l_n_memory(chunk):
    """The forward keeps only states at chunk boundaries: (b, K, d, n) with K = ⌈l / chunk⌉."""
    ext = cpu.extension()
    b, d, l, n = 1, 16, 10 * chunk, 8
    u = torch.randn(b, d, l)
    B = torch.randn(b, 1, l, n)  # the kernel's own layout (b, g, l, n)
    _, _, saved = ext.fwd(u, u.clone(), -torch.ones(d, n), B, B.clone(), None, None, None, None, True)
    assert saved.shape == (b, math.ceil(l / chunk), d, n)


def test_float64_is_refused(chunk):
    x = make_inputs(1, 4, 5, 2)
    with pytest.raises(ValueError, match="float64"):
        cpu.selective_scan_cpu(*(x[k] for k in NAMES[:8]), True, None)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SSMKIT_NO_CPU_EXT", "1")
    reason = cpu.unavailable_reason()
    assert reason is not None and "SSMKIT_NO_CPU_EXT" in reason
    x = make_inputs(1, 4, 5, 2)
    with pytest.raises(RuntimeError, match="SSMKIT_NO_CPU_EXT"):
        cpu.selective_scan_cpu(*(x[k].float() if x[k] is not None else None for k in NAMES[:8]), True, None)
