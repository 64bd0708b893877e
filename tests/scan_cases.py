"""Shared helpers for selective-scan backend tests: random inputs for every option, and the comparisons.

Import from any test module (``tests/conftest.py`` puts this folder on ``sys.path``)::

    from scan_cases import ScanCase, covering_cases, make_inputs, run_with_grads, assert_scan_matches

    case = ScanCase(b=3, d=17, n=4, l=33, D=True, z=True, delta_bias=True, softplus=True,
                    B_layout="grouped", C_layout="invariant", groups=17, initial_state=True)
    args = make_inputs(case, dtype=torch.float32, requires_grad=True)   # ScanArgs
    out, last = my_backend(*args.positional())                          # the backend signature
    assert_scan_matches(my_backend, selective_scan_reference, case, last_state_grad=True)

A backend is any function ``fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state) ->
(out, last_state)`` (the signature of ``selective_scan_reference``, ``selective_scan_chunked`` and
``selective_scan_cpu``). Tolerances (issue 4): float32 forward ≤ 1e-5 relative to the largest |value|,
gradients ≤ 1e-4 relative to the gradient's norm. This module is a stable API for other backend tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUTS = ("variable", "grouped", "invariant")
"""B/C layouts: variable (b, n, l), grouped (b, g, n, l), time-invariant (d, n)."""

FWD_RTOL = 1e-5
"""float32 forward tolerance, relative to max |expected|."""

GRAD_RTOL = 1e-4
"""float32 gradient tolerance, ||actual - expected|| / ||expected||."""

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@dataclass(frozen=True)
class ScanCase:
    """One selective-scan configuration: sizes and which options are on."""

    b: int = 2
    """batch"""
    d: int = 4
    """channels"""
    n: int = 3
    """state size"""
    l: int = 9
    """sequence length"""
    D: bool = False
    """skip connection D (d,)"""
    z: bool = False
    """SiLU(z) gate (b, d, l)"""
    delta_bias: bool = False
    """delta_bias (d,)"""
    softplus: bool = False
    """delta_softplus; when False, Δ is drawn positive"""
    B_layout: str = "variable"
    """one of LAYOUTS"""
    C_layout: str = "variable"
    """one of LAYOUTS"""
    groups: int = 1
    """g for grouped B/C; must divide d"""
    initial_state: bool = False
    """initial_state (b, d, n)"""
    seed: int = 0
    """torch.Generator seed for the inputs"""

    def __post_init__(self):
        for name in ("B_layout", "C_layout"):
            if getattr(self, name) not in LAYOUTS:
                raise ValueError(f"{name} must be one of {LAYOUTS}, got {getattr(self, name)!r}")
        if self.d % self.groups != 0:
            raise ValueError(f"groups must divide d = {self.d}, got {self.groups}")

    def replace(self, **changes) -> ScanCase:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:  # readable pytest ids
        opts = [k for k in ("D", "z", "delta_bias", "softplus", "initial_state") if getattr(self, k)]
        g = f"g{self.groups}" if "grouped" in (self.B_layout, self.C_layout) else ""
        return f"b{self.b}d{self.d}n{self.n}l{self.l}-B{self.B_layout[:3]}-C{self.C_layout[:3]}{g}" + (
            "-" + "+".join(opts) if opts else ""
        )


ALL_OPTIONS = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True)


@dataclass
class ScanArgs:
    """The inputs of one call, in the backend argument order."""

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None
    z: Tensor | None
    delta_bias: Tensor | None
    delta_softplus: bool
    initial_state: Tensor | None

    def positional(self) -> tuple:
        """(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)."""
        return (
            self.u,
            self.delta,
            self.A,
            self.B,
            self.C,
            self.D,
            self.z,
            self.delta_bias,
            self.delta_softplus,
            self.initial_state,
        )

    def tensors(self) -> dict[str, Tensor]:
        """The tensor arguments that are present, by name (GRAD_NAMES order)."""
        return {k: getattr(self, k) for k in GRAD_NAMES if getattr(self, k) is not None}

    def to(self, device=None, dtype=None, requires_grad: bool = False) -> ScanArgs:
        """A detached copy on device/dtype (leaves that require grad when asked)."""
        new = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.detach().to(device=device, dtype=dtype).requires_grad_(requires_grad)
            new[f.name] = v
        return ScanArgs(**new)


def make_inputs(
    case: ScanCase, dtype: torch.dtype = torch.float32, device="cpu", requires_grad: bool = False
) -> ScanArgs:
    """Random inputs for ``case``, drawn in float64 from a seeded generator, then cast to ``dtype``.

    Values are in the trained-model regime: A = -exp(U(-1, 1.5)) in [-4.5, -0.37]; Δ ≈ 0.05..1 after
    softplus (or drawn in [0.02, 0.6] when there is no softplus), so states neither explode nor vanish.
    """
    g = torch.Generator().manual_seed(case.seed)
    b, d, n, l = case.b, case.d, case.n, case.l

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def bc(layout):
        if layout == "variable":
            return rnd(b, n, l)
        if layout == "grouped":
            return rnd(b, case.groups, n, l)
        return rnd(d, n)

    u = rnd(b, d, l)
    if case.softplus:
        delta = rnd(b, d, l) * 0.5 - 1.0
    else:
        delta = torch.rand(b, d, l, generator=g, dtype=torch.float64) * 0.58 + 0.02
    A = -torch.exp(torch.rand(d, n, generator=g, dtype=torch.float64) * 2.5 - 1.0)
    args = ScanArgs(
        u=u,
        delta=delta,
        A=A,
        B=bc(case.B_layout),
        C=bc(case.C_layout),
        D=rnd(d) if case.D else None,
        z=rnd(b, d, l) if case.z else None,
        delta_bias=rnd(d) * 0.3 if case.delta_bias else None,
        delta_softplus=case.softplus,
        initial_state=rnd(b, d, n) if case.initial_state else None,
    )
    return args.to(device=device, dtype=dtype, requires_grad=requires_grad)


def run_with_grads(fn, args: ScanArgs, last_state_grad: bool = True, seed: int = 1):
    """Run ``fn`` and backpropagate a fixed random cotangent through out (and last_state when asked).

    Returns (out, last_state, grads) with grads a dict name -> gradient for every tensor argument.
    The cotangents are drawn from ``seed`` in float64 on the CPU, so two backends get the same ones.
    """
    leaves = args.tensors()
    for t in leaves.values():
        if not t.requires_grad:
            raise ValueError("run_with_grads needs args made with requires_grad=True")
    out, last = fn(*args.positional())
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(tuple(out.shape), generator=g, dtype=torch.float64).to(out.device, torch.float32)
    loss = (out.float() * w_out).sum()
    if last_state_grad:
        w_last = torch.randn(tuple(last.shape), generator=g, dtype=torch.float64).to(
            last.device, torch.float32
        )
        loss = loss + (last.float() * w_last).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return out.detach(), last.detach(), {k: gr for k, gr in zip(leaves, grads)}


def assert_rel_close(actual: Tensor, expected: Tensor, rtol: float, name: str) -> None:
    """max |actual - expected| within rtol · max |expected| (elementwise, via assert_close)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    scale = max(expected.abs().max().item(), 1e-30) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def assert_grad_close(actual: Tensor | None, expected: Tensor | None, rtol: float, name: str) -> None:
    """||actual - expected|| ≤ rtol · ||expected|| (the gradient tolerance of issue 4)."""
    assert actual is not None and expected is not None, f"gradient of {name} missing"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: gradient shape {tuple(a.shape)} != {tuple(e.shape)}"
    err, ref = (a - e).norm().item(), e.norm().item()
    assert err <= rtol * max(ref, 1e-30), f"grad {name}: ||diff|| {err:.3e} > {rtol} · ||ref|| {ref:.3e}"


def assert_scan_matches(
    fn,
    reference,
    case: ScanCase,
    last_state_grad: bool = True,
    fwd_rtol: float = FWD_RTOL,
    grad_rtol: float = GRAD_RTOL,
    device="cpu",
) -> None:
    """``fn`` on ``device`` in float32 vs ``reference`` on the CPU in float32: out, last_state, all grads."""
    base = make_inputs(case, dtype=torch.float32)
    ref_out, ref_last, ref_grads = run_with_grads(reference, base.to(requires_grad=True), last_state_grad)
    out, last, grads = run_with_grads(fn, base.to(device=device, requires_grad=True), last_state_grad)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    assert last.shape == ref_last.shape
    assert_rel_close(out, ref_out, fwd_rtol, "out")
    assert_rel_close(last, ref_last, fwd_rtol, "last_state")
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        assert_grad_close(grads[k], ref_grads[k], grad_rtol, k)


def _covering_cases(chunk: int) -> list[ScanCase]:
    """A covering set over b ∈ {1, 3}, d ∈ {1, 17, 64}, n ∈ {1, 4, 16},
    l ∈ {1, 7, chunk − 1, chunk, chunk + 1, 1000}: every value of every size and every option/layout
    appears, without the full cartesian product."""
    return [
        ScanCase(b=1, d=1, n=1, l=1),
        ScanCase(b=3, d=17, n=4, l=7, **ALL_OPTIONS),
        ScanCase(b=1, d=64, n=16, l=chunk - 1, B_layout="grouped", C_layout="invariant", groups=4),
        ScanCase(b=3, d=17, n=16, l=chunk, B_layout="invariant", C_layout="variable", initial_state=True),
        ScanCase(
            b=1, d=17, n=4, l=chunk + 1, B_layout="grouped", C_layout="grouped", groups=17, D=True, z=True
        ),
        ScanCase(b=3, d=1, n=16, l=chunk + 1, softplus=True, delta_bias=True, initial_state=True),
        ScanCase(b=3, d=64, n=4, l=1000, **ALL_OPTIONS),
        ScanCase(b=1, d=64, n=1, l=1000, B_layout="invariant", C_layout="invariant", initial_state=True),
        ScanCase(b=1, d=17, n=16, l=7, B_layout="variable", C_layout="grouped", groups=1, z=True),
        ScanCase(b=3, d=64, n=16, l=chunk, B_layout="grouped", C_layout="grouped", groups=8, **ALL_OPTIONS),
    ]


def covering_cases(chunk: int) -> list[ScanCase]:
    """The covering set for a backend with chunk length ``chunk`` (l = chunk − 1, chunk, chunk + 1)."""
    return _covering_cases(chunk)
