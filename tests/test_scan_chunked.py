"""The chunked (blocked) selective scan against the sequential reference: outputs and every gradient.

Tolerances from issue 4: float32 forward ≤ 1e-5 relative, gradients ≤ 1e-4 relative to their norm;
``gradcheck`` in float64. ``chunks_per_block`` is forced small in some cases so that several blocks (and
the state carried between them) are exercised, not only several chunks in one block.
"""

from __future__ import annotations

import functools

import pytest
import torch
from scan_cases import (
    ALL_OPTIONS,
    ScanCase,
    assert_rel_close,
    assert_scan_matches,
    covering_cases,
    make_inputs,
)

from ssmkit.scan.chunked import CHUNK_SIZE, selective_scan_chunked
from ssmkit.scan.reference import selective_scan_reference

# the l = 1000 cases (every option, many chunks) take ~10-25 s each against the Python-loop reference: slow
CASES = [pytest.param(c, marks=pytest.mark.slow) if c.l >= 1000 else c for c in covering_cases(CHUNK_SIZE)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunked_matches_reference(case):
    assert_scan_matches(selective_scan_chunked, selective_scan_reference, case, last_state_grad=True)


@pytest.mark.parametrize(
    "case, chunk_size, chunks_per_block",
    [
        (ScanCase(b=3, d=17, n=4, l=100, **ALL_OPTIONS), 8, 1),  # 13 chunks, one per block
        (ScanCase(b=1, d=64, n=16, l=1000, B_layout="grouped", groups=4, initial_state=True), 32, 3),
        (ScanCase(b=3, d=1, n=1, l=7, z=True, C_layout="invariant"), 1, 2),  # chunk length 1
        (ScanCase(b=1, d=17, n=4, l=33, D=True, softplus=True), 64, None),  # chunk longer than l
    ],
    ids=str,
)
@pytest.mark.parametrize("last_state_grad", [True, False], ids=["dlast", "no-dlast"])
def test_chunked_blocks_match_reference(case, chunk_size, chunks_per_block, last_state_grad):
    fn = functools.partial(selective_scan_chunked, chunk_size=chunk_size, chunks_per_block=chunks_per_block)
    assert_scan_matches(fn, selective_scan_reference, case, last_state_grad=last_state_grad)


def test_chunked_gradcheck_float64():
    """Every input, including initial_state, and both outputs; several chunks, blocks and padding."""
    case = ScanCase(b=2, d=4, n=2, l=7, B_layout="grouped", C_layout="variable", groups=2, **ALL_OPTIONS)
    args = make_inputs(case, dtype=torch.float64, requires_grad=True)
    names = list(args.tensors())

    def fn(*tensors):
        a = args.to()
        for k, v in zip(names, tensors):
            setattr(a, k, v)
        return selective_scan_chunked(*a.positional(), chunk_size=2, chunks_per_block=2)

    assert torch.autograd.gradcheck(fn, tuple(args.tensors().values()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_chunked_float64_exact():
    """In float64 the blocked recurrence equals the sequential one to rounding."""
    case = ScanCase(b=2, d=5, n=3, l=77, B_layout="invariant", C_layout="grouped", groups=5, **ALL_OPTIONS)
    args = make_inputs(case, dtype=torch.float64)
    out, last = selective_scan_chunked(*args.positional(), chunk_size=8, chunks_per_block=3)
    ref_out, ref_last = selective_scan_reference(*args.positional())
    assert out.dtype == torch.float64 and last.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, ref_last, rtol=1e-12, atol=1e-12)


def test_chunked_bfloat16_inputs():
    """bf16 inputs are upcast: float32 state, bf16 output equal to the reference's on the same inputs."""
    case = ScanCase(b=2, d=16, n=4, l=70, **ALL_OPTIONS)
    args = make_inputs(case, dtype=torch.bfloat16)
    out, last = selective_scan_chunked(*args.positional())
    ref_out, ref_last = selective_scan_reference(*args.positional())
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert_rel_close(last, ref_last, 1e-5, "last_state")
    assert_rel_close(out.float(), ref_out.float(), 1e-2, "out")  # one bf16 rounding of the same float32 value


def test_chunked_large_decay_is_stable():
    """Huge Δ·|A| (exp underflows to 0) and tiny Δ: finite and equal to the reference."""
    case = ScanCase(b=1, d=8, n=4, l=50, softplus=True, initial_state=True)
    args = make_inputs(case, dtype=torch.float32)
    args.delta = args.delta + torch.linspace(-30.0, 60.0, 50)  # Δ from ~1e-13 to 60
    args.A = args.A * 100.0  # Δ·A down to about -2.7e4
    out, last = selective_scan_chunked(*args.positional(), chunk_size=8)
    ref_out, ref_last = selective_scan_reference(*args.positional())
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert_rel_close(out, ref_out, 1e-5, "out")
    assert_rel_close(last, ref_last, 1e-5, "last_state")


def test_chunked_empty_sequence():
    args = make_inputs(ScanCase(b=2, d=3, n=2, l=0, initial_state=True))
    out, last = selective_scan_chunked(*args.positional())
    assert out.shape == (2, 3, 0)
    torch.testing.assert_close(last, args.initial_state, rtol=0, atol=0)


def test_chunked_bad_chunk_size():
    args = make_inputs(ScanCase())
    with pytest.raises(ValueError, match=r"chunk_size and chunks_per_block must be >= 1, got 0 and None"):
        selective_scan_chunked(*args.positional(), chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "case",
    [
        ScanCase(b=3, d=64, n=16, l=1000, **ALL_OPTIONS),
        ScanCase(b=1, d=17, n=4, l=CHUNK_SIZE + 1, B_layout="grouped", C_layout="invariant", groups=17),
    ],
    ids=str,
)
def test_chunked_on_cuda_matches_reference_on_cpu(case):
    assert_scan_matches(selective_scan_chunked, selective_scan_reference, case, device="cuda")
