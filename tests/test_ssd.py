"""``ssmkit.ssd`` (Mamba-2's SSD operator) and ``ssd_step`` against independent references.

1. Every backend against the sequential float64 loop (``reference``): outputs, the final state and the
   gradient of every input (x, dt, A, B, C, D, z, dt_bias, initial_states) for a loss on y and on the
   final state, over a covering set of shapes and options (chunk 8, so l ∈ {1, 7, 8, 9, 29} crosses chunk
   boundaries and padding).
2. A literal transcription of Listing 1 of Dao & Gu (2024, arXiv 2405.21060), written here in float64
   with Δ processed here, as the independent check of both backends' semantics.
3. Packed sequences (``seq_idx``) equal the sequences run one by one; ``ssd_step`` equals a one-token
   ``ssd``; float32 / bf16 accuracy against float64; empty sizes; argument errors; backend selection.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.scan.ssd import ssd, ssd_step

ssd_module = importlib.import_module("ssmkit.scan.ssd")

CHUNK = 8


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 1
    l: int = 7  # noqa: E741
    h: int = 1
    p: int = 1
    n: int = 1
    g: int = 1
    D: str | None = None  # None | "h" | "hp"
    z: bool = False
    dt_bias: bool = False
    softplus: bool = False
    dt_limit: tuple = (0.0, math.inf)
    init: bool = False
    seq_idx: bool = False

    def __str__(self) -> str:
        flags = [k for k in ("z", "dt_bias", "softplus", "init", "seq_idx") if getattr(self, k)]
        if self.D:
            flags.append(f"D{self.D}")
        if self.dt_limit != (0.0, math.inf):
            flags.append("limit")
        return f"b{self.b}l{self.l}h{self.h}p{self.p}n{self.n}g{self.g}" + (
            "-" + "-".join(flags) if flags else ""
        )


ALL = dict(D="h", z=True, dt_bias=True, softplus=True, init=True, seq_idx=True)
CASES = [
    Case(),  # everything 1, nothing optional
    Case(l=1, **ALL),
    Case(b=2, l=7, h=3, p=8, n=16, g=3, D="hp", z=True, init=True),
    Case(b=1, l=CHUNK - 1, h=3, p=1, n=16, g=1, dt_bias=True, softplus=True),
    Case(b=2, l=CHUNK, h=1, p=8, n=1, D="h", init=True, seq_idx=True),
    Case(b=2, l=CHUNK + 1, h=3, p=8, n=16, g=1, **ALL),
    Case(b=1, l=CHUNK + 1, h=3, p=1, n=1, g=3, softplus=True, dt_limit=(0.05, 0.3)),
    Case(b=2, l=3 * CHUNK + 5, h=3, p=8, n=16, g=3, **ALL, dt_limit=(0.0, 0.5)),
    Case(b=1, l=3 * CHUNK + 5, h=1, p=1, n=16, g=1, z=True),
    Case(b=2, l=3 * CHUNK + 5, h=3, p=1, n=1, g=1, seq_idx=True, init=True),
]


def make(case: Case, dtype=torch.float64, seed: int = 0) -> dict:
    """Random inputs of ``case`` (leaf tensors with requires_grad) as keyword arguments of ``ssd``."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    b, l, h, p, n, g = case.b, case.l, case.h, case.p, case.n, case.g
    kw = dict(
        x=rnd(b, l, h, p),
        # raw dt: positive (0.05..0.55) when used as Δ directly; around softplus⁻¹(0.1) otherwise
        dt=(torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 0.5 + 0.05).to(dtype).requires_grad_()
        if not case.softplus
        else rnd(b, l, h, scale=1.0),
        A=(-torch.rand(h, generator=gen, dtype=torch.float64) * 3 - 0.2).to(dtype).requires_grad_(),
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
    )
    if case.D == "h":
        kw["D"] = rnd(h)
    elif case.D == "hp":
        kw["D"] = rnd(h, p)
    if case.z:
        kw["z"] = rnd(b, l, h, p)
    if case.dt_bias:
        kw["dt_bias"] = rnd(h, scale=0.5)
    if case.init:
        kw["initial_states"] = rnd(b, h, p, n)
    if case.seq_idx:
        # sequence boundaries at awkward places: inside a chunk, on a chunk edge, at position 1
        cuts = sorted({c for c in (1, 3, CHUNK, CHUNK + 2, 2 * CHUNK + 1) if c < l})
        ids = torch.zeros(b, l, dtype=torch.int64)
        for i in range(b):
            for c in cuts[i % 2 :: 1 + i % 2]:
                ids[i, c:] += 1
        kw["seq_idx"] = ids
    kw["dt_softplus"] = case.softplus
    kw["dt_limit"] = case.dt_limit
    return kw


def leaves(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def run(kw: dict, backend: str, chunk_size: int = CHUNK):
    """y, final state and the gradients of every input for a loss on both (fixed random weights)."""
    for v in leaves(kw).values():
        v.grad = None
    y, final = ssd(**kw, chunk_size=chunk_size, return_final_states=True, backend=backend)
    gen = torch.Generator().manual_seed(123)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    wf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    ((y * wy).sum() + (final * wf).sum()).backward()
    grads = {k: v.grad.clone() for k, v in leaves(kw).items()}
    return y.detach(), final.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunked_matches_reference_float64(case):
    kw = make(case)
    y_ref, f_ref, g_ref = run(kw, "reference")
    y, f, g = run(kw, "chunked")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    assert f.dtype == torch.float64
    assert set(g) == set(g_ref) and len(g) >= 5
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


# ---- Listing 1 of Dao & Gu (2024), transcribed literally (einsum strings and steps as printed) ----------


def listing1_segsum(x):
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # repeat(x, "... d -> ... d e", e=T)
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=0)
    x_segsum = x_segsum.masked_fill(~mask, -torch.inf)
    return x_segsum


def listing1_ssd(X, A, B, C, block_len, initial_states=None):
    """X (b, l, h, p), A (b, l, h), B, C (b, l, h, n); l a multiple of block_len. Returns Y, final_state."""
    b, l, h, p = X.shape

    def chunk(t):  # rearrange(t, "b (c l) ... -> b c l ...", l=block_len)
        return t.reshape(b, l // block_len, block_len, *t.shape[2:])

    X, A, B, C = (chunk(t) for t in (X, A, B, C))
    A = A.permute(0, 3, 1, 2)  # rearrange(A, "b c l h -> b h c l")
    A_cumsum = torch.cumsum(A, dim=-1)
    # 1. Compute the output for each intra-chunk (diagonal blocks)
    L = torch.exp(listing1_segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    # 2. Compute the state for each intra-chunk
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    # 3. Compute the inter-chunk SSM recurrence
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(listing1_segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. Compute state -> output conversion per chunk
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)
    Y = (Y_diag + Y_off).reshape(b, l, h, p)  # rearrange(..., "b c l h p -> b (c l) h p")
    return Y, final_state


def listing1_full(kw: dict, block_len: int):
    """Δ processing, groups, D and the gate done here, around Listing 1 (which has none of them)."""
    x, dt, A, B, C = (kw[k].detach() for k in ("x", "dt", "A", "B", "C"))
    b, l, h, p = x.shape
    g = B.shape[2]
    if kw.get("dt_bias") is not None:
        dt = dt + kw["dt_bias"].detach()
    if kw["dt_softplus"]:
        dt = torch.log1p(torch.exp(dt))  # softplus, written out
    if tuple(kw["dt_limit"]) != (0.0, math.inf):
        dt = dt.clamp(*kw["dt_limit"])
    pad = (-l) % block_len
    Xd = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # zero steps leave the state unchanged
    Ad = F.pad(A * dt, (0, 0, 0, pad))
    Bh = F.pad(B.repeat_interleave(h // g, dim=2), (0, 0, 0, 0, 0, pad))
    Ch = F.pad(C.repeat_interleave(h // g, dim=2), (0, 0, 0, 0, 0, pad))
    init = kw.get("initial_states")
    Y, final = listing1_ssd(Xd, Ad, Bh, Ch, block_len, None if init is None else init.detach()[:, None])
    Y = Y[:, :l]
    D = kw.get("D")
    if D is not None:
        Y = Y + x * (D.detach()[:, None] if D.dim() == 1 else D.detach())
    if kw.get("z") is not None:
        Y = Y * kw["z"].detach() * torch.sigmoid(kw["z"].detach())
    return Y, final


@pytest.mark.parametrize("case", [c for c in CASES if not c.seq_idx], ids=str)
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_matches_listing1_float64(case, backend):
    kw = make(case)
    y_ref, f_ref = listing1_full(kw, block_len=4)  # a different chunking than the backend's
    with torch.no_grad():
        y, f = ssd(**kw, chunk_size=CHUNK, return_final_states=True, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(f, f_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_seq_idx_equals_separate_sequences(backend):
    """Packed sequences = each one run alone (the first from initial_states, the others from zero)."""
    case = Case(b=1, l=3 * CHUNK + 5, h=3, p=8, n=16, g=3, D="h", z=True, dt_bias=True, softplus=True)
    kw = make(case)
    kw["initial_states"] = torch.randn(1, 3, 8, 16, dtype=torch.float64)
    bounds = [0, 3, CHUNK, CHUNK + 2, 3 * CHUNK + 5]  # a 3-, 5-, 2- and 19-token sequence
    ids = torch.zeros(1, case.l, dtype=torch.int64)
    for k, (s, e) in enumerate(zip(bounds, bounds[1:])):
        ids[0, s:e] = 7 * k + 2  # any integers, not 0..k
    with torch.no_grad():
        y, f = ssd(**kw, seq_idx=ids, chunk_size=CHUNK, return_final_states=True, backend=backend)
        pieces = []
        for k, (s, e) in enumerate(zip(bounds, bounds[1:])):
            part = {
                key: (
                    v[:, s:e]
                    if isinstance(v, torch.Tensor) and v.dim() >= 2 and key != "initial_states"
                    else v
                )
                for key, v in kw.items()
            }
            part["initial_states"] = kw["initial_states"] if k == 0 else None
            yk, fk = listing1_full(part, block_len=2)
            pieces.append(yk)
    torch.testing.assert_close(y, torch.cat(pieces, dim=1), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(f, fk, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize(
    "case", [Case(b=2, h=3, p=8, n=16, g=3, **ALL), Case(b=1, h=4, p=2, n=5, g=2, D="hp")], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_equals_one_token_ssd(case, dtype):
    kw = make(case, dtype=dtype)
    kw.pop("seq_idx", None)
    state = kw.pop("initial_states", None)
    if state is None:
        state = torch.randn(case.b, case.h, case.p, case.n, dtype=dtype)
    x, dt, B, C, z = kw.pop("x"), kw.pop("dt"), kw.pop("B"), kw.pop("C"), kw.pop("z", None)
    with torch.no_grad():
        for t in range(3):  # three decode steps, each against a one-token ssd from the same state
            y_ref, s_ref = ssd(
                x[:, t : t + 1], dt[:, t : t + 1], B=B[:, t : t + 1], C=C[:, t : t + 1],
                z=None if z is None else z[:, t : t + 1], initial_states=state, return_final_states=True,
                backend="reference", **kw,
            )  # fmt: skip
            y, new = ssd_step(
                state, x[:, t], dt[:, t], B=B[:, t], C=C[:, t], z=None if z is None else z[:, t], **kw
            )
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            torch.testing.assert_close(y, y_ref[:, 0], rtol=tol, atol=tol)
            torch.testing.assert_close(new, s_ref, rtol=tol, atol=tol)
            assert new.dtype == s_ref.dtype and new.data_ptr() != state.data_ptr()
            state = new


def test_step_is_functional_and_differentiable():
    gen = torch.Generator().manual_seed(5)
    b, h, p, n, g = 2, 3, 4, 5, 1
    shapes = dict(
        state=(b, h, p, n), x=(b, h, p), dt=(b, h), A=(h,), B=(b, g, n), C=(b, g, n), D=(h,), z=(b, h, p)
    )
    kw = {k: torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for k, s in shapes.items()}
    kw["dt_bias"] = torch.randn(h, generator=gen, dtype=torch.float64).requires_grad_()
    before = kw["state"].detach().clone()
    y, new = ssd_step(**kw, dt_softplus=True)
    (y.sum() + new.sum()).backward()
    assert torch.equal(kw["state"].detach(), before)  # the given state is not modified
    for name, t in kw.items():
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_float32_close_to_float64(chunk_size):
    """float32 chunked vs the float64 loop on Mamba-2-like magnitudes (Δ ~ softplus(bias), A ∈ −[1, 16])."""
    b, l, h, p, g, n = 2, 3 * chunk_size + 5, 4, 16, 2, 32
    gen = torch.Generator().manual_seed(1)
    kw64 = dict(
        x=torch.randn(b, l, h, p, generator=gen, dtype=torch.float64),
        dt=torch.randn(b, l, h, generator=gen, dtype=torch.float64),
        A=-torch.empty(h, dtype=torch.float64).uniform_(1, 16, generator=gen),
        B=torch.randn(b, l, g, n, generator=gen, dtype=torch.float64),
        C=torch.randn(b, l, g, n, generator=gen, dtype=torch.float64),
        D=torch.randn(h, generator=gen, dtype=torch.float64),
        dt_bias=torch.log(
            torch.expm1(torch.empty(h, dtype=torch.float64).uniform_(0.001, 0.1, generator=gen))
        ),
        initial_states=torch.randn(b, h, p, n, generator=gen, dtype=torch.float64),
    )
    y64, f64 = ssd(
        **kw64, dt_softplus=True, chunk_size=chunk_size, return_final_states=True, backend="reference"
    )
    kw32 = {k: v.float() for k, v in kw64.items()}
    y32, f32 = ssd(
        **kw32, dt_softplus=True, chunk_size=chunk_size, return_final_states=True, backend="chunked"
    )
    assert y32.dtype == torch.float32 and f32.dtype == torch.float32
    assert (y32.double() - y64).norm() / y64.norm() < 1e-6
    assert (f32.double() - f64).norm() / f64.norm() < 1e-6
    kw16 = {k: v.bfloat16() if k in ("x", "B", "C") else v.float() for k, v in kw64.items()}
    y16, f16 = ssd(
        **kw16, dt_softplus=True, chunk_size=chunk_size, return_final_states=True, backend="chunked"
    )
    assert y16.dtype == torch.bfloat16 and f16.dtype == torch.float32  # float32 state for bf16 inputs
    assert (y16.double() - y64).norm() / y64.norm() < 3e-2


def test_default_dt_limit_does_not_clamp():
    """As mamba-ssm: Δ is clamped only for a non-default dt_limit (a negative Δ without softplus stays)."""
    kw = make(Case(l=5, h=2))
    with torch.no_grad():
        kw["dt"].neg_()
        y0 = ssd(**kw, backend="chunked")
        kw["dt_limit"] = (0.0, 10.0)
        y1 = ssd(**kw, backend="chunked")
        y_ref, _ = listing1_full(dict(kw, dt_limit=(0.0, math.inf)), block_len=5)
    torch.testing.assert_close(y0, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y1, torch.zeros_like(y1), rtol=0, atol=1e-12)  # Δ = 0: no input reaches y


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize(
    "shape",
    [(0, 5, 2, 3, 1, 4), (2, 0, 2, 3, 1, 4), (2, 5, 0, 3, 1, 4), (2, 5, 2, 0, 1, 4), (2, 5, 2, 3, 1, 0)],
)
def test_empty_sizes(backend, shape):
    b, l, h, p, g, n = shape
    x = torch.randn(b, l, h, p)
    init = torch.randn(b, h, p, n)
    D = torch.randn(h)
    y, f = ssd(
        x, torch.rand(b, l, h), -torch.rand(h), torch.randn(b, l, g, n), torch.randn(b, l, g, n), D=D,
        initial_states=init, return_final_states=True, backend=backend,
    )  # fmt: skip
    assert y.shape == (b, l, h, p) and f.shape == (b, h, p, n) and f.dtype == torch.float32
    if l == 0:
        torch.testing.assert_close(f, init)
    if n == 0:
        torch.testing.assert_close(y, x * D[:, None])  # only the skip term is left


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(2, 5, 4)), r"x must be a 4-d tensor \(b, l, h, p\)"),
        (dict(dt=torch.randn(2, 5, 3)), r"dt must have shape \(b, l, h\) = \(2, 5, 4\), got \(2, 5, 3\)"),
        (dict(A=torch.randn(4, 1)), r"A must have shape \(h,\) = \(4,\)"),
        (dict(B=torch.randn(2, 5, 3, 6), C=torch.randn(2, 5, 3, 6)), r"group count g = 3 .* h = 4"),
        (dict(C=torch.randn(2, 5, 2, 7)), r"C must have shape .* = \(2, 5, 2, 6\)"),
        (dict(D=torch.randn(4, 2)), r"D must have shape \(h,\) or \(h, p\) = \(4, 3\)"),
        (dict(initial_states=torch.randn(2, 4, 3, 5)), r"initial_states must have shape .*\(2, 4, 3, 6\)"),
        (dict(seq_idx=torch.zeros(2, 5)), r"seq_idx must be an integer tensor"),
        (dict(chunk_size=0), r"chunk_size must be a positive int, got 0"),
        (dict(dt_limit=(1.0, 0.5)), r"dt_limit must have min <= max"),
        (dict(backend="cuda"), r"backend must be one of"),
    ],
)
def test_argument_errors(change, match):
    kw = dict(
        x=torch.randn(2, 5, 4, 3), dt=torch.rand(2, 5, 4), A=-torch.rand(4), B=torch.randn(2, 5, 2, 6),
        C=torch.randn(2, 5, 2, 6),
    )  # fmt: skip
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        ssd(**kw)


def test_step_argument_errors():
    with pytest.raises(ValueError, match=r"state must have shape \(b, h, p, n\) = \(2, 4, 3, 6\)"):
        ssd_step(torch.zeros(2, 4, 3, 5), torch.randn(2, 4, 3), torch.rand(2, 4), -torch.rand(4),
                 torch.randn(2, 1, 6), torch.randn(2, 1, 6))  # fmt: skip


def test_backend_selection(monkeypatch):
    x = torch.randn(1, 3, 2, 2)
    monkeypatch.delenv(ssd_module.ENV_VAR, raising=False)
    assert ssd_module.resolve_backend("auto", x) == "chunked"  # CPU: the pure-PyTorch block form
    monkeypatch.setenv(ssd_module.ENV_VAR, "reference")
    assert ssd_module.resolve_backend("auto", x) == "reference"
    assert ssd_module.resolve_backend("chunked", x) == "chunked"  # an explicit choice wins
    calls = []
    monkeypatch.setattr(
        ssd_module, "ssd_reference", lambda *a: calls.append(1) or ssd_module.ssd_chunked(*a[:5], 4, *a[5:])
    )
    ssd(x, torch.rand(1, 3, 2), -torch.rand(2), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    assert calls == [1]
    monkeypatch.setenv(ssd_module.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SSMKIT_SSD_BACKEND must be one of"):
        ssd(x, torch.rand(1, 3, 2), -torch.rand(2), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))


@pytest.mark.parametrize("chunks_per_block", [1, 2])
@pytest.mark.parametrize("case", [CASES[5], CASES[7], CASES[9]], ids=str)
def test_chunked_blocks_match_reference(case, chunks_per_block):
    """Several blocks of chunks (the state carried between blocks), outputs and every gradient."""
    from ssmkit.scan.ssd_chunked import ssd_chunked

    kw = make(case)
    y_ref, f_ref, g_ref = run(kw, "reference")
    for v in leaves(kw).values():
        v.grad = None
    delta = ssd_module.process_dt(
        kw["dt"], kw.get("dt_bias"), kw["dt_softplus"], kw["dt_limit"], torch.float64
    )
    y, f = ssd_chunked(
        kw["x"], delta, kw["A"], kw["B"], kw["C"], CHUNK, kw.get("D"), kw.get("z"), kw.get("initial_states"),
        kw.get("seq_idx"), chunks_per_block=chunks_per_block,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(123)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    wf = torch.randn(f.shape, generator=gen, dtype=torch.float64)
    ((y * wy).sum() + (f * wf).sum()).backward()
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f.detach(), f_ref, rtol=1e-10, atol=1e-10)
    for name, v in leaves(kw).items():
        torch.testing.assert_close(v.grad, g_ref[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("shape", [(0, 2, 3, 1, 4), (2, 0, 3, 1, 4), (2, 2, 0, 1, 4), (2, 2, 3, 1, 0)])
def test_step_empty_sizes(shape):
    b, h, p, g, n = shape
    state, x, D = torch.randn(b, h, p, n), torch.randn(b, h, p), torch.randn(h)
    y, new = ssd_step(
        state, x, torch.rand(b, h), -torch.rand(h), torch.randn(b, g, n), torch.randn(b, g, n), D=D
    )
    assert y.shape == (b, h, p) and new.shape == (b, h, p, n)
    if n == 0:
        torch.testing.assert_close(y, x * D[:, None])


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_bf16_autocast_keeps_float32_math(backend):
    """Under bf16 autocast (bf16 training) the matmuls inside must not drop to bf16."""
    kw = make(Case(b=2, l=3 * CHUNK + 5, h=3, p=8, n=16, g=1, D="h", init=True), dtype=torch.float32)
    with torch.no_grad():
        y, f = ssd(**kw, chunk_size=CHUNK, return_final_states=True, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ac, f_ac = ssd(**kw, chunk_size=CHUNK, return_final_states=True, backend=backend)
            state = kw["initial_states"]
            x, dt, B, C = (kw[k][:, 0] for k in ("x", "dt", "B", "C"))
            ys, news = ssd_step(state, x, dt, kw["A"], B, C, D=kw["D"])
        ys_ref, news_ref = ssd_step(state, x, dt, kw["A"], B, C, D=kw["D"])
    assert y_ac.dtype == torch.float32 and f_ac.dtype == torch.float32
    torch.testing.assert_close(y_ac, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_ac, f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ys, ys_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(news, news_ref, rtol=1e-6, atol=1e-6)


def test_auto_backend_on_cuda(monkeypatch):
    """auto on CUDA: mamba-ssm's kernel when it imports (not for float64), else chunked with one warning."""
    monkeypatch.setattr(ssd_module, "_warned", [])
    monkeypatch.setattr(ssd_module, "_mamba_ssm_ssd", lambda: None)
    with pytest.warns(RuntimeWarning, match="mamba_ssm is not installed"):
        assert ssd_module._auto_backend("cuda", torch.float32) == "chunked"
    assert ssd_module._auto_backend("cuda", torch.bfloat16) == "chunked"  # warned once only
    monkeypatch.setattr(ssd_module, "_mamba_ssm_ssd", lambda: object())
    assert ssd_module._auto_backend("cuda", torch.bfloat16) == "mamba_ssm"
    assert ssd_module._auto_backend("cuda", torch.float64) == "chunked"
    assert ssd_module._auto_backend("cpu", torch.float32) == "chunked"


def test_chunked_gradcheck_float64():
    """Finite differences on every input and both outputs (several chunks, padding, seq_idx, groups)."""
    kw = make(Case(b=1, l=7, h=2, p=2, n=3, g=2, D="h", z=True, dt_bias=True, softplus=True, init=True))
    kw["seq_idx"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    names = list(leaves(kw))

    def fn(*tensors):
        return ssd(
            **{**kw, **dict(zip(names, tensors))}, chunk_size=3, return_final_states=True, backend="chunked"
        )

    assert torch.autograd.gradcheck(fn, [kw[k] for k in names])
