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
the digits of a small difference of two large numbers). Groups: B and C are shared by the h / g heads of a
group, so C Bᵀ (step 1) is computed once per group.

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


def segsum(a: Tensor) -> Tensor:
    """Stable segment sum: a (..., L) -> (..., L, L) with out[..., t, s] = a_{s+1} + … + a_t for s ≤ t
    (0 on the diagonal) and −∞ above it, by a masked cumulative sum down each column."""
    L = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, L)  # (..., L, L): rows[t, s] = a_t
    ones = torch.ones(L, L, dtype=torch.bool, device=a.device)  # (L, L)
    out = rows.masked_fill(~ones.tril(-1), 0.0).cumsum(dim=-2)  # (..., L, L): keep a_t for s < t, sum down
    return out.masked_fill(~ones.tril(0), -torch.inf)  # (..., L, L)


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
) -> tuple[Tensor, Tensor]:
    """SSD by block decomposition; Δ = ``dt`` already processed. Shapes and result as ``ssd_reference``.

    Args:
        x: (b, l, h, p), l >= 1.  dt: (b, l, h).  A: (h,).  B, C: (b, l, g, n).  chunk_size: L >= 1.
        D: (h,) or (h, p).  z: (b, l, h, p).  initial_states: (b, h, p, n).  seq_idx: (b, l) integer.
    Returns:
        y (b, l, h, p) in x's dtype, final state (b, h, p, n) float32 (float64 for float64 x).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g  # heads per group
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    L = min(chunk_size, l)
    c = -(-l // L)  # number of chunks
    pad = c * L - l

    dtf = dt.to(acc)  # (b, l, h)
    a = dtf * A.to(acc)  # (b, l, h)
    if seq_idx is not None:
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))  # (b, l) True where a new sequence starts
        a = a.masked_fill(starts[..., None], -torch.inf)  # (b, l, h)
    X = x.to(acc) * dtf[..., None]  # (b, l, h, p)
    if pad:
        a = F.pad(a, (0, 0, 0, pad))  # (b, c·L, h)
        X = F.pad(X, (0, 0, 0, 0, 0, pad))  # (b, c·L, h, p)
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    a = a.view(b, c, L, h).permute(0, 3, 1, 2)  # (b, h, c, L)
    X = X.view(b, c, L, h, p).permute(0, 3, 1, 2, 4)  # (b, h, c, L, p)
    Bc = B.to(acc).view(b, c, L, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, L, n)
    Cc = C.to(acc).view(b, c, L, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, L, n)

    # 1. intra-chunk: the diagonal blocks, a masked "attention" C Bᵀ with decays exp(segsum(a)).
    decay = torch.exp(segsum(a))  # (b, h, c, L, L): decay[t, s] = exp(a_{s+1} + … + a_t), 0 for s > t
    CB = Cc @ Bc.transpose(-1, -2)  # (b, g, c, L, L), once per group
    M = decay.view(b, g, r, c, L, L) * CB[:, :, None]  # (b, g, r, c, L, L)
    Y = M.view(b, h, c, L, L) @ X  # (b, h, c, L, p)

    # 2. chunk states: what each chunk adds to the state, from a zero start.
    to_end = decay[..., -1, :]  # (b, h, c, L): exp(a_{s+1} + … + a_{L-1})
    Xw = (X * to_end[..., None]).view(b, g, r, c, L, p)  # (b, g, r, c, L, p)
    local = torch.einsum("bgrclp,bgcln->bgrcpn", Xw, Bc).reshape(b, h, c, p, n)  # (b, h, c, p, n)

    # 3. inter-chunk recurrence: the true state at every chunk start, and the final state.
    a_cum = a.cumsum(dim=-1)  # (b, h, c, L): a_0 + … + a_t within each chunk
    chunk_decay = torch.exp(a_cum[..., -1])  # (b, h, c)
    if initial_states is None:
        state = local.new_zeros(b, h, p, n)  # (b, h, p, n)
    else:
        state = initial_states.to(acc)  # (b, h, p, n)
    start_states = []
    for k in range(c):
        start_states.append(state)
        state = chunk_decay[:, :, k, None, None] * state + local[:, :, k]  # (b, h, p, n)
    S = torch.stack(start_states, dim=2).view(b, g, r, c, p, n)  # (b, g, r, c, p, n)

    # 4. state -> output: the off-diagonal blocks, C_t · S[k] decayed from the chunk start to t.
    Y_off = torch.einsum("bgcln,bgrcpn->bgrclp", Cc, S).reshape(b, h, c, L, p)  # (b, h, c, L, p)
    Y = Y + Y_off * torch.exp(a_cum)[..., None]  # (b, h, c, L, p)

    y = Y.permute(0, 2, 3, 1, 4).reshape(b, c * L, h, p)[:, :l]  # (b, l, h, p)
    xf = x.to(acc)
    if D is not None:
        Df = D.to(acc)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)  # (b, l, h, p)
    if z is not None:
        y = y * F.silu(z.to(acc))  # (b, l, h, p)
    return y.to(x.dtype), state
