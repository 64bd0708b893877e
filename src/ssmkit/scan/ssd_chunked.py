"""The SSD block decomposition of Mamba-2 in matmuls: pure PyTorch, any device, differentiable by autograd.

Reference: Dao & Gu, "Transformers are SSMs" (2024, arXiv 2405.21060), §6 ("the SSD algorithm: block
decomposition") and its Listing 1. ``ssmkit.scan.ssd_reference`` is the slow twin this is tested against.

Because A is a scalar per head, the whole sequence map y = M x is one structured (l, l) matrix per head,

    M[t, s] = C_t · B_s · exp(a_{s+1} + … + a_t)  for s ≤ t (0 above the diagonal),   a_t = Δ_t A,

applied to the discretised input X_s = Δ_s x_s. Cut into chunks of length L (``chunk_size``), M splits into
diagonal blocks (within a chunk: dense and small) and off-diagonal blocks (across chunks: rank n, through
the state). Four steps, each a batched matmul or a short loop:

    1. intra-chunk   Y_diag = (exp(segsum(a)) ∘ C Bᵀ) X          per chunk, quadratic in L (like attention)
    2. chunk states  S_loc[k] = Σ_s exp(a_{s+1} + … + a_{end}) X_s ⊗ B_s   what chunk k adds to the state
    3. inter-chunk   S[k+1] = exp(Σ_{t ∈ k} a_t) S[k] + S_loc[k]  sequential over chunks (l / L steps)
    4. state->output Y_off = exp(a_0 + … + a_t) C_t · S[k]          the contribution of earlier chunks

y = Y_diag + Y_off. ``segsum(a)[t, s] = a_{s+1} + … + a_t`` is formed by the *stable* masked cumulative sum
(each entry a sum of the a's it covers, never a difference of two long prefix sums, which in float32 loses
the digits of a small difference of two large numbers); step 2 reads its decays from the last row of that
same matrix (Listing 1 takes a difference of prefix sums there), and step 4's are prefix sums. No exponent
is ever a difference. Groups: B and C are shared by the h / g heads of a group, so C Bᵀ (step 1) and its
causal mask are computed once per group.

Blocks: the chunks are processed k at a time (k = ``chunks_per_block``, by default so that a block's
(L, L) decays and chunk states hold about 2 MiB), in order, the state carried from block to block; so the
working set stays in cache instead of streaming (b, h, c, L, L) tensors for the whole sequence through
memory (on a 2-core EPYC, 1.2–2× faster than all chunks at once, more at long l).

Layouts: the chunk states and the output stay in x's own (b, c, L, h, p) order, which BLAS reads in place
as (L, h·p) matrices; only the (L, L) blocks of step 1 are head-major (b, h, c, L, ·).

Packed sequences (``seq_idx``): where the id changes at t, a_t is set to −∞, so every decay across t is
exp(−∞) = 0 — the state resets and no step below needs a special case. The sequence is padded to a whole
number of chunks with Δ = 0 steps (a = 0, X = 0: the state passes through unchanged), whose outputs are
dropped; a sequence shorter than ``chunk_size`` is one chunk of its own length.

Glossary: b batch, l length, h heads, p head dimension, g groups, n state size, c chunks, L chunk length;
a = Δ·A the log-decay per step, X = Δ·x the discretised input, S the state at a chunk's start.
Accumulation is float32 (float64 for float64 x); the output is cast back to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_ELEMENTS = 1 << 19
"""Target elements of a block's (b, h, k, L, L) decays plus (b, k, h, p, n) states (2 MiB in float32)."""


def segsum_open(a: Tensor) -> Tensor:
    """Stable segment sum without its mask: a (..., L) -> (..., L, L), out[..., t, s] = a_{s+1} + … + a_t
    for s ≤ t (0 on the diagonal), by a masked cumulative sum down each column (Listing 1's ``segsum``).
    The entries above the diagonal come out 0, not Listing 1's −∞: the causal mask is applied afterwards
    to C Bᵀ, once per group rather than once per head."""
    L = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, L)  # (..., L, L): rows[t, s] = a_t
    keep = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # (L, L) t > s
    return rows.masked_fill(~keep, 0.0).cumsum(dim=-2)  # (..., L, L): column s sums a_{s+1..t}


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    chunks_per_block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """SSD by block decomposition; Δ = ``dt`` already processed. Shapes and result as ``ssd_reference``.

    Args:
        x: (b, l, h, p), l >= 1.  dt: (b, l, h).  A: (h,).  B, C: (b, l, g, n).  chunk_size: L >= 1.
        D: (h,) or (h, p).  z: (b, l, h, p).  initial_states: (b, h, p, n).  seq_idx: (b, l) integer.
        chunks_per_block: chunks processed together (default: about ``BLOCK_ELEMENTS`` elements of
            (L, L) and state tensors per block, so a block's working set stays in cache).
    Returns:
        y (b, l, h, p) in x's dtype, final state (b, h, p, n) float32 (float64 for float64 x).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    L = min(chunk_size, l)
    if chunks_per_block is None:  # enough chunks that a block's (L, L) and state tensors fill ~2 MiB
        chunks_per_block = max(1, BLOCK_ELEMENTS // (b * h * (L * L + p * n)))
    span = chunks_per_block * L  # positions per block

    dtf = dt.to(acc)  # (b, l, h)
    a = dtf * A.to(acc)  # (b, l, h)
    if seq_idx is not None:
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))  # (b, l) True where a new sequence starts
        a = a.masked_fill(starts[..., None], -torch.inf)  # (b, l, h)
    state = None if initial_states is None else initial_states.to(acc)  # (b, h, p, n)
    # Everything of length l is cut into blocks here (split, not indexing: under autograd each slice would
    # cost a zero-filled full-size gradient), so only the output is ever materialised for the whole sequence.
    pieces = [t.split(span, dim=1) for t in (x, dtf, a, B, C)]
    zs = z.split(span, dim=1) if z is not None else [None] * len(pieces[0])
    ys = []
    for x_k, dt_k, a_k, B_k, C_k, z_k in zip(*pieces, zs):
        m = x_k.shape[1]  # positions in this block
        c = -(-m // L)  # its chunks
        pad = c * L - m  # only the last block can be short: padded with Δ = 0 steps
        X_k = x_k.to(acc) * dt_k[..., None]  # (b, m, h, p)
        B_k, C_k = B_k.to(acc), C_k.to(acc)  # (b, m, g, n)
        if pad:
            a_k = F.pad(a_k, (0, 0, 0, pad))  # (b, c·L, h)
            X_k = F.pad(X_k, (0, 0, 0, 0, 0, pad))  # (b, c·L, h, p)
            B_k = F.pad(B_k, (0, 0, 0, 0, 0, pad))
            C_k = F.pad(C_k, (0, 0, 0, 0, 0, pad))
        # Two layouts: "natural" (b, c, L, h, ·) — x's own, used for the chunk states and the output — and
        # "head-major" (b, h, c, L, ·) for the (L, L) blocks. Views wherever BLAS can read them in place.
        y_k, state = _chunks(
            a_k.view(b, c, L, h).permute(0, 3, 1, 2),  # (b, h, c, L) view
            X_k.view(b, c, L, h, p),  # (b, c, L, h, p)
            B_k.view(b, c, L, g, n).transpose(2, 3),  # (b, c, g, L, n) view
            C_k.view(b, c, L, g, n).transpose(2, 3),  # (b, c, g, L, n) view
            state,
        )  # (b, c, L, h, p), (b, h, p, n)
        ys.append(_finish(y_k.reshape(b, c * L, h, p)[:, :m], x_k, D, z_k, acc))  # (b, m, h, p)
    return (torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]), state


def _chunks(a_h: Tensor, Xc: Tensor, Bc: Tensor, Cc: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Steps 1–4 on c consecutive chunks from the state before them (None: zeros).

    a_h (b, h, c, L), Xc (b, c, L, h, p), Bc and Cc (b, c, g, L, n) -> y (b, c, L, h, p), the state after.
    """
    b, h, c, L = a_h.shape
    p, g, n = Xc.shape[-1], Bc.shape[2], Bc.shape[-1]
    r = h // g

    # 1. intra-chunk: the diagonal blocks, a masked "attention" C Bᵀ with decays exp(segsum(a)). The
    #    causal mask is applied to C Bᵀ, once per group, instead of to every head's decay matrix.
    decay = segsum_open(a_h).exp_()  # (b, h, c, L, L): exp(a_{s+1} + … + a_t) for s ≤ t (1 above)
    upper = torch.ones(L, L, dtype=torch.bool, device=a_h.device).triu(1)  # (L, L)
    CB = (Cc @ Bc.transpose(-1, -2)).masked_fill_(upper, 0.0)  # (b, c, g, L, L), causal
    M = decay.view(b, g, r, c, L, L) * CB.transpose(1, 2)[:, :, None]  # (b, g, r, c, L, L)
    Y_diag = M.view(b, h, c, L, L) @ Xc.permute(0, 3, 1, 2, 4)  # (b, h, c, L, p)

    # 2. chunk states: what each chunk adds to the state from a zero start, Σ_s decay-to-end · X_s ⊗ B_s.
    to_end = decay[..., -1, :].permute(0, 2, 3, 1)  # (b, c, L, h): exp(a_{s+1} + … + a_{L−1})
    Xw = (Xc * to_end[..., None]).reshape(b, c, L, g, r * p)  # (b, c, L, g, r·p)
    local = (Xw.permute(0, 1, 3, 4, 2) @ Bc).view(b, c, h, p, n)  # (b, c, h, p, n)

    # 3. inter-chunk recurrence: the true state at every chunk start, and the state after the last.
    a_cum = a_h.cumsum(dim=-1)  # (b, h, c, L): a_0 + … + a_t within each chunk
    if state is None and c == 1:  # one chunk from zero: nothing arrives from earlier chunks
        return Y_diag.permute(0, 2, 3, 1, 4), local[:, 0]  # (b, 1, L, h, p), (b, h, p, n)
    chunk_decay = torch.exp(a_cum[..., -1])  # (b, h, c)
    if state is None:
        state = local.new_zeros(b, h, p, n)  # (b, h, p, n)
    start_states = []
    # unbind, not local[:, k]: under autograd each indexing would cost a zero-filled local-sized gradient
    for local_k, decay_k in zip(local.unbind(1), chunk_decay[..., None, None].unbind(2)):
        start_states.append(state)
        state = torch.addcmul(local_k, state, decay_k)  # (b, h, p, n)
    S = start_states[0][:, None] if c == 1 else torch.stack(start_states, dim=1)  # (b, c, h, p, n)
    S = S.view(b, c, g, r * p, n)  # (b, c, g, r·p, n)

    # 4. state -> output: the off-diagonal blocks, C_t · S[k] decayed from the chunk start to t.
    Y_off = (Cc @ S.transpose(-1, -2)).view(b, c, g, L, r, p).transpose(2, 3)  # (b, c, L, g, r, p)
    Y_off = Y_off.reshape(b, c, L, h, p)  # (b, c, L, h, p) (a view when g = 1)
    from_start = torch.exp(a_cum).permute(0, 2, 3, 1)[..., None]  # (b, c, L, h, 1): exp(a_0 + … + a_t)
    return torch.addcmul(Y_diag.permute(0, 2, 3, 1, 4), Y_off, from_start), state  # (b, c, L, h, p)


def _finish(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None, acc: torch.dtype) -> Tensor:
    """y + D x, then · SiLU(z); cast to x's dtype. y (b, l, h, p) in ``acc``."""
    if D is not None:
        Df = D.to(acc)
        y = torch.addcmul(y, x.to(acc), Df[:, None] if Df.dim() == 1 else Df)  # (b, l, h, p)
    if z is not None:
        y = y * F.silu(z.to(acc))  # (b, l, h, p)
    return y.to(x.dtype)
