"""Chunked selective scan: pure PyTorch, any device, differentiable through autograd.

Reference: Gu & Dao (2023), §3.2 Algorithm 2 and §3.3 (the scan is an associative recurrence, so it can be
split into chunks whose partial results are combined); the two-level "blocked scan" of Blelloch (1990),
§1.2. ``ssmkit.scan.reference`` is the slow twin this backend is tested against.

Glossary (code -> paper), see ``ssmkit.scan`` for the full one:
    x = Δ·u (b, d, l)       the discretised input (Euler for B: B̄_t u_t = Δ_t B_t u_t)
    dA = exp(Δ·A)           Ā_t (b, d, n) per step (zero-order hold for A)
    Bx = Δ·u·B              B̄_t u_t (b, d, n) per step
    c                       chunk length (``chunk_size``); k indexes chunks
    S_k                     the true state at the start of chunk k (b, d, n)

The algorithm. Pad the sequence with identity steps (Ā = 1 and B̄u = 0 exactly, even for an infinite
A, so the last state is unchanged) to a multiple of c and cut it into chunks. Chunks are taken k at a
time (a *block*; k = ``chunks_per_block``, by default so that one step's (b, k, d, n) tensor is about
1 MiB and stays in cache). The k chunks of a block advance *together*, one position at a time, so a
Python step works on (b, k, d, n) tensors instead of the reference's (b, d, n):

    1. local pass   h ← Ā_t ⊙ h + B̄_t u_t from h = 0, for t = 1..c, in every chunk at once;
                    h_end[k] is what chunk k adds to the state.
    2. carry pass   S_{k+1} = exp(A · Σ_{t ∈ k} Δ_t) ⊙ S_k + h_end[k], sequential over chunks (cheap).
    3. output pass  h ← Ā_t ⊙ h + B̄_t u_t again, now from h = S_k in every chunk, and y_t = C_t · h_t.

A block of one chunk (k = 1: large b·d·n, or l ≤ c) knows its start state, so it runs pass 3 alone — the
reference's loop. Inputs are copied once to time-major (b, l, d) layout, so that a step's slice has d
contiguous. Exponentials are taken as exp2(Δ · A·log2 e) (as mamba-ssm's CUDA kernel does): PyTorch's CPU
exp2 is several times faster than its exp. Under autograd each block is checkpointed (recomputed in the
backward pass), so the memory kept for the backward is O(b·d·l), not (b, d, l, n); inside a block, pass 3
reuses pass 1's Ā_t and B̄_t u_t when autograd keeps them anyway, else recomputes them.

Why not the segment-sum (SSD) matmul form of Mamba-2 (Dao & Gu 2024, §6)? There A is a scalar per
head, so the intra-chunk decay exp(segsum(ΔA)) is a (c, c) matrix shared by all state entries. Here A is
(d, n): the decay differs for every state entry n, so that form would need a (c, c, n) tensor per channel,
i.e. c times more exponentials than the recurrence itself. The blocked recurrence does exactly the
reference's arithmetic (each exponent is Δ_t·A or Σ Δ_t·A — never a difference of cumulative sums, never a
growing positive number when Δ ≥ 0 and A ≤ 0), with about k/2 times fewer Python steps, and keeps
per-position (b, d, n) tensors only for one block of c·k positions at a time (never (b, d, l, n) for the
whole sequence: under autograd each block is checkpointed).

NaN and ±inf: the padded steps are exact identities, and a call whose state or output is not finite is
recomputed by the reference loop (the blocked order can turn ±inf into NaN where the loop does not), so
non-finite values propagate exactly as in ``ssmkit.scan.reference``, forward and backward.

Accumulation is float32 (float64 when u is float64); bf16/fp16 inputs are accepted and upcast. The output is
cast back to u's dtype; the last state stays in the accumulation dtype, like the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ssmkit.scan.reference import selective_scan_reference

CHUNK_SIZE = 32
"""Default chunk length c: the number of sequential Python steps per pass and block."""

_LOG2E = 1.4426950408889634  # log2(e)
_STEP_ELEMENTS = 1 << 18
"""Target size (elements) of one step's (b, k, d, n) tensor when ``chunks_per_block`` is None: ~1 MiB."""


def _bc_layout(M: Tensor, d: int) -> tuple[Tensor, int, bool]:
    """B or C -> (tensor, groups G, varies_in_time).

    (d, n) time-invariant -> ((d, n), d, False); (b, n, l) -> ((b, 1, n, l), 1, True);
    (b, g, n, l) grouped -> ((b, g, n, l), g, True). Channel i belongs to group i // (d // G).
    """
    if M.dim() == 2:
        return M, d, False  # (d, n)
    if M.dim() == 3:
        return M[:, None], 1, True  # (b, 1, n, l)
    return M, M.shape[1], True  # (b, g, n, l)


def _swap_last2(X: Tensor) -> Tensor:
    """(b, p, q) -> contiguous (b, q, p), through PyTorch's blocked 2-d transpose copy (much faster than
    a general permuted copy)."""
    if X.shape[0] == 1:
        return X[0].t().contiguous()[None]  # (1, q, p)
    return torch.stack([x.t().contiguous() for x in X.unbind(0)])  # (b, q, p)


def _time_major(M: Tensor, varies: bool, pad: int) -> Tensor:
    """A variable B/C (b, G, n, l) -> zero-padded, time-major (b, l_pad, G, n); an invariant one unchanged."""
    if not varies:
        return M  # (d, n)
    return F.pad(M, (0, pad)).permute(0, 3, 1, 2).contiguous()  # (b, l_pad, G, n)


def _times_b(x: Tensor, Bt: Tensor, varies: bool, G: int) -> Tensor:
    """B̄_t u_t: x (b, k, d) = Δ·u at one step of each chunk, times B_t (b, k, G, n) or B (d, n).

    Returns (b, k, d, n).
    """
    if not varies:
        return x[..., None] * Bt  # (b, k, d, n)
    b, k, d = x.shape
    xg = x.reshape(b, k, G, d // G, 1)  # (b, k, G, dg, 1)
    return (xg * Bt[..., None, :]).reshape(b, k, d, Bt.shape[-1])  # (b, k, d, n)


def _step_terms(dt_t, x_t, A_, B_t, varB: bool, GB: int, step: slice) -> tuple[Tensor, Tensor]:
    """Ā_t = exp(Δ_t A) and B̄_t u_t at one position of every chunk of a block: (b, k, d, n) each."""
    dA = torch.exp2(dt_t[:, step, :, None] * A_)  # (b, k, d, n)
    Bx = _times_b(x_t[:, step], B_t[:, step] if varB else B_t, varB, GB)  # (b, k, d, n)
    return dA, Bx


def _contract_c(h: Tensor, Ct: Tensor, varies: bool, G: int) -> Tensor:
    """y_t = C_t · h_t: h (b, k, d, n) with C_t (b, k, G, n) or C (d, n) -> (b, k, d)."""
    if not varies:
        return (h * Ct).sum(-1)  # (b, k, d)
    b, k, d, n = h.shape
    hg = h.reshape(b, k, G, d // G, n)  # (b, k, G, dg, n)
    if k == 1:  # a batched mat-vec is fastest for one chunk, a fused multiply-sum for several
        return (hg @ Ct[..., None]).reshape(b, k, d)  # (b, 1, G, dg, 1) -> (b, 1, d)
    return (hg * Ct[..., None, :]).sum(-1).reshape(b, k, d)  # (b, k, G, dg) -> (b, k, d)


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    *,
    chunk_size: int = CHUNK_SIZE,
    chunks_per_block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Blocked selective scan; arguments as ``ssmkit.selective_scan`` (already validated there).

    Args:
        u, delta, z: (b, d, l).  A: (d, n).  B, C: (b, n, l) | (b, g, n, l) | (d, n).  D, delta_bias: (d,).
        initial_state: (b, d, n) or None (zeros).
        chunk_size: positions per chunk (c ≥ 1).  chunks_per_block: chunks advanced together (≥ 1);
            None picks it so that one step's (b, chunks, d, n) tensor is about 1 MiB.
    Returns:
        out (b, d, l) in u's dtype; last_state (b, d, n) float32 (float64 for float64 u), differentiable.
    """
    if chunk_size < 1 or (chunks_per_block is not None and chunks_per_block < 1):
        raise ValueError(
            f"chunk_size and chunks_per_block must be >= 1, got {chunk_size} and {chunks_per_block}"
        )
    if u.numel() == 0 or A.numel() == 0:  # b, d, l or n = 0: the reference's (empty or state-only) answer
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    b, d, l = u.shape
    n = A.shape[1]
    u_ = u.to(acc)  # (b, d, l)
    dt = delta.to(acc)  # (b, d, l)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A_ = A.to(acc) * _LOG2E  # (d, n): A·log2(e), so that exp(Δ·A) = exp2(Δ·A·log2 e)
    Bm, GB, varB = _bc_layout(B.to(acc), d)
    Cm, GC, varC = _bc_layout(C.to(acc), d)
    state = (
        torch.zeros(b, d, n, dtype=acc, device=u.device) if initial_state is None else initial_state.to(acc)
    )  # (b, d, n)
    if l == 0:
        return u.new_zeros(b, d, 0), state

    c = min(chunk_size, l)
    nc = -(-l // c)  # number of chunks
    pad = nc * c - l  # identity steps at the end: Ā = 1 and B̄u = 0 (forced, see `terms`)
    # time-major copies, so that one step of all chunks is a (b, k, d) slice with d contiguous
    dt_t = _swap_last2(F.pad(dt, (0, pad)))  # (b, l_pad, d)
    x_t = _swap_last2(F.pad(dt * u_, (0, pad)))  # (b, l_pad, d): Δ·u
    B_t = _time_major(Bm, varB, pad)  # (b, l_pad, G, n) or (d, n)
    C_t = _time_major(Cm, varC, pad)  # (b, l_pad, G, n) or (d, n)

    if chunks_per_block is None:  # keep one step's (b, k, d, n) tensors about 1 MiB: cache-resident
        chunks_per_block = max(1, _STEP_ELEMENTS // max(1, b * d * n))
    A_ = A_[None, None]  # (1, 1, d, n)

    def run_block(state: Tensor, k0: int, k: int) -> tuple[Tensor, Tensor]:
        """Chunks k0 .. k0+k-1 from their start state -> (outputs (b, k·c, d) time-major, end state)."""
        t0, t1 = k0 * c, (k0 + k) * c  # the block's positions
        A_p, B_p = A_, B_t
        if t1 > l and k > 1:  # the last chunk ends in padded steps: there A and B are replaced by 0
            padded = torch.arange(k, device=u.device).view(1, k, 1, 1) == k - 1  # (1, k, 1, 1)
            A_p = torch.where(padded, torch.zeros_like(A_), A_)  # (1, k, d, n)
            if not varB:
                B_p = torch.where(padded, torch.zeros_like(B_t), B_t)  # (1, k, d, n)

        def terms(t: int) -> tuple[Tensor, Tensor]:
            """Ā, B̄u at step t of every chunk. A padded step is exactly (1, 0) — exp(0 · 0), 0 · 0 — also for
            an infinite or NaN A or B (where exp(0 · A) would be NaN, forward or backward)."""
            if t1 > l and t >= c - pad:
                return _step_terms(dt_t, x_t, A_p, B_p, varB, GB, slice(t0 + t, t1, c))  # (b, k, d, n) each
            return _step_terms(dt_t, x_t, A_, B_t, varB, GB, slice(t0 + t, t1, c))  # (b, k, d, n) each

        if k == 1:  # one chunk: its start state is known, so a single sequential pass suffices
            h, y_blk = state, []
            for t in range(t0, min(t1, l)):  # (its padded steps are skipped)
                now = slice(t, t + 1)
                dA = torch.exp2(dt_t[:, t, :, None] * A_[0])  # (b, d, n)
                Bx = _times_b(x_t[:, now], B_t[:, now] if varB else B_t, varB, GB)  # (b, 1, d, n)
                h = torch.addcmul(Bx[:, 0], dA, h)  # (b, d, n)
                y_blk.append(_contract_c(h[:, None], C_t[:, now] if varC else C_t, varC, GC))  # (b, 1, d)
            if t1 > l:
                y_blk.append(h.new_zeros(b, t1 - l, d))  # (b, pad, d), cut off below
            return torch.cat(y_blk, dim=1), h  # (b, c, d), (b, d, n)

        keep = torch.is_grad_enabled()  # under autograd pass 3 reuses pass 1's terms (saved anyway)
        h, kept = None, []
        for t in range(c):
            dA, Bx = terms(t)  # (b, k, d, n) each
            h = Bx if h is None else torch.addcmul(Bx, dA, h)  # (b, k, d, n)
            if keep:
                kept.append((dA, Bx))
        h_end = h  # (b, k, d, n)

        dt_sum = dt_t[:, t0:t1].reshape(b, k, c, d).sum(2)  # (b, k, d)
        decay = torch.exp2(dt_sum[..., None] * A_)  # (b, k, d, n)
        starts = []
        for j in range(k):
            starts.append(state)
            state = torch.addcmul(h_end[:, j], decay[:, j], state)  # (b, d, n)
        h = torch.stack(starts, dim=1)  # (b, k, d, n)

        y_blk = []
        for t in range(c):  # Ā_t, B̄_t u_t: pass 1's under autograd, else recomputed
            step = slice(t0 + t, t1, c)
            dA, Bx = kept[t] if keep else terms(t)  # (b, k, d, n)
            h = torch.addcmul(Bx, dA, h)  # (b, k, d, n)
            y_blk.append(_contract_c(h, C_t[:, step] if varC else C_t, varC, GC))  # (b, k, d)
        return torch.stack(y_blk, dim=2).reshape(b, k * c, d), state  # (b, k·c, d), (b, d, n)

    # Under autograd each block is checkpointed: only its start state is kept, and its (b, k·c, d, n)
    # intermediates are recomputed in the backward pass, so memory stays O(b·d·l + one block), never
    # (b, d, l, n) — at the price of running the forward twice.
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    )
    ys = []
    for k0 in range(0, nc, chunks_per_block):
        k = min(chunks_per_block, nc - k0)  # chunks in this block
        if grad:
            y_blk, state = checkpoint(run_block, state, k0, k, use_reentrant=False)
        else:
            y_blk, state = run_block(state, k0, k)
        ys.append(y_blk)  # (b, k·c, d), time-major

    y = _swap_last2((ys[0] if len(ys) == 1 else torch.cat(ys, dim=1))[:, :l])  # (b, d, l)
    if D is not None:
        y = y + D.to(acc)[None, :, None] * u_
    if z is not None:
        y = y * F.silu(z.to(acc))
    with torch.no_grad():
        finite = bool(torch.isfinite(y.sum()) and torch.isfinite(state.sum()))
    if not finite:
        # NaN/inf somewhere: the blocked order (carry pass, checkpointed backward) can meet +inf and -inf
        # where the sequential loop does not, so such a call is answered by the reference loop, whose NaN
        # and ±inf — forward and backward — are the contract. Finite calls pay two sums.
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return y.to(u.dtype), state
