"""Reference selective scan: the sequential loop, exact, differentiable through autograd.

The slow twin of every fast backend (``chunked``, ``cpu``); tests compare them against it. Computes in
float32 (or float64 when the inputs are float64) and never materialises (b, d, l, n) beyond one step.
See ``ssmkit.scan`` for the glossary and the recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def expand_bc(M: Tensor, b: int, d: int, l: int) -> Tensor:
    """B or C in any accepted layout -> (b, d, n, l). A view for (d, n) and (b, n, l); a copy for grouped."""
    if M.dim() == 2:  # (d, n) time-invariant
        return M[None, :, :, None].expand(b, d, M.shape[1], l)  # (b, d, n, l)
    if M.dim() == 3:  # (b, n, l)
        return M[:, None].expand(b, d, M.shape[1], l)  # (b, d, n, l)
    g = M.shape[1]  # (b, g, n, l): channel i uses group i // (d // g)
    return M.repeat_interleave(d // g, dim=1)  # (b, d, n, l)


def _bc_step(M: Tensor, t: int, b: int, d: int) -> Tensor:
    """B_t or C_t (b, d, n) at step t from any accepted layout, without expanding the whole sequence."""
    if M.dim() == 2:  # (d, n) time-invariant
        return M[None].expand(b, d, M.shape[1])  # (b, d, n)
    if M.dim() == 3:  # (b, n, l)
        return M[:, None, :, t].expand(b, d, M.shape[1])  # (b, d, n)
    g = M.shape[1]  # (b, g, n, l): channel i uses group i // (d // g)
    return M[:, :, None, :, t].expand(b, g, d // g, M.shape[2]).reshape(b, d, M.shape[2])  # (b, d, n)


def selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """Sequential selective scan. Arguments as ``ssmkit.selective_scan``; returns (out, last_state)."""
    dtype_in = u.dtype
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    b, d, l = u.shape
    u_, dt = u.to(acc), delta.to(acc)  # (b, d, l)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A_ = A.to(acc)  # (d, n)
    B_, C_ = B.to(acc), C.to(acc)
    h = (
        torch.zeros(b, d, A.shape[1], dtype=acc, device=u.device)
        if initial_state is None
        else initial_state.to(acc)
    )  # (b, d, n)
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, :, t, None] * A_)  # (b, d, n)
        h = dA * h + (dt[:, :, t] * u_[:, :, t])[..., None] * _bc_step(B_, t, b, d)  # (b, d, n)
        ys.append((h * _bc_step(C_, t, b, d)).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1) if l > 0 else u_.new_zeros(b, d, 0)  # (b, d, l)
    if D is not None:
        y = y + D.to(acc)[None, :, None] * u_
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(dtype_in), h
