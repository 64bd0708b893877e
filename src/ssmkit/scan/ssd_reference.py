"""The SSD recurrence of Mamba-2 as a sequential loop: the slow twin of ``ssmkit.scan.ssd``'s fast paths.

Reference: Dao & Gu, "Transformers are SSMs" (2024, arXiv 2405.21060), §3 and eq. (2) with a scalar A per
head (the "SSD" restriction, §6); argument semantics of mamba-ssm's ``mamba_chunk_scan_combined``.

For each head (its group is head // (h / g)) and time step t, with Δ already processed (bias, softplus,
limits — ``ssmkit.scan.ssd.process_dt``):

    h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t ⊗ B_t         h (p, n) per head: zero-order hold for A, Euler for B
    y_t = C_t · h_t + D x_t                           (contracting n)
    y_t ← y_t · SiLU(z_t)                             when the optional gate z is given

A change of ``seq_idx`` between t − 1 and t starts a new sequence: h_{t−1} is replaced by 0 (packed
sequences); ``initial_states`` seeds only the first position.

Glossary: b batch, l length, h heads, p head dimension (channels per head), g groups of B/C, n state size.
Everything is computed in float32 (float64 when x is float64), one Python step per position: exact and slow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ssd_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The sequential SSD loop; Δ = ``dt`` is already processed (no bias / softplus / limits here).

    Args:
        x: (b, l, h, p).  dt: (b, l, h) Δ.  A: (h,).  B, C: (b, l, g, n) with g dividing h.
        D: (h,) or (h, p) skip.  z: (b, l, h, p) gate.  initial_states: (b, h, p, n).
        seq_idx: (b, l) integer sequence ids; the state resets where it changes.
    Returns:
        y (b, l, h, p) in x's dtype and the final state (b, h, p, n) float32 (float64 for float64 x).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = h // g if g else 1  # heads per group
    xf, dtf, Af = x.to(acc), dt.to(acc), A.to(acc)  # (b, l, h, p), (b, l, h), (h,)
    Bh = B.to(acc).repeat_interleave(r, dim=2)  # (b, l, h, n)
    Ch = C.to(acc).repeat_interleave(r, dim=2)  # (b, l, h, n)
    if initial_states is None:
        state = x.new_zeros(b, h, p, n, dtype=acc)  # (b, h, p, n)
    else:
        state = initial_states.to(acc)  # (b, h, p, n)
    ys = []
    for t in range(l):
        dA = torch.exp(dtf[:, t] * Af)  # (b, h)
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(acc)  # (b,)
            dA = dA * keep[:, None]  # (b, h): a new sequence forgets the old state
        dBx = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = dA[:, :, None, None] * state + dBx  # (b, h, p, n)
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))  # (b, h, p)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)  # (b, l, h, p)
    if D is not None:
        Df = D.to(acc)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)  # (b, l, h, p)
    if z is not None:
        y = y * F.silu(z.to(acc))  # (b, l, h, p)
    return y.to(x.dtype), state
