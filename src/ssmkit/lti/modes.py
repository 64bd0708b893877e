"""The three computation modes of a discrete linear SSM: recurrent, convolutional, parallel scan.

References:
    Gu, Goel, Ré, "Efficiently Modeling Long Sequences with Structured State Spaces" (ICLR 2022), §2.3–2.4
        (recurrent and convolutional views); Blelloch, "Prefix Sums and Their Applications" (CMU-CS-90-190,
        1990); Smith, Warrington, Linderman, "Simplified State Space Layers for Sequence Modeling" (S5,
        ICLR 2023), §2.2 and App. H (the linear recurrence as an associative scan). See docs/parallel-scan.md.

Glossary (code -> paper):
    Ab, Bb, C, D   Ā, B̄, C, D of x_k = Ā x_{k−1} + B̄ u_k,  y_k = C x_k + D u_k  (x_{−1} = ``state`` or 0)
    u (..., l, p)  the input sequence (or (..., l) for a diagonal SISO system)
    y (..., l, q)  the output sequence (or (..., l))
    a, b, h        the scan h_t = a_t ⊙ h_{t−1} + b_t, or h_t = a_t @ h_{t−1} + b_t for matrix a_t
    K              the kernel K̄ (see ``ssmkit.lti.kernels``)

The theorem of the lecture: for an LTI system the three modes give the same y:
    recurrent:      y = C x_k + D u_k with the loop above                        O(l) sequential steps
    convolutional:  y_k = Σ_{j<=k} K_j u_{k−j} + D u_k, by FFT                    O(l log l) work
    scan:           x = scan(Ā, B̄ u), y = C x + D u                               O(log l) sequential steps
Fast and slow twins: ``scan_parallel`` / ``scan_sequential``; ``convolve`` / a direct sum in the tests.
``convolve_fft`` is ``convolve`` without the validation (the layers call it on their own checked tensors).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ssmkit.lti._checks import broadcast_lead, check_tensor, common_dtype, shape, structure

# ----------------------------------------------------------------------------------------------------
# scan: h_t = a_t ∘ h_{t−1} + b_t
# ----------------------------------------------------------------------------------------------------


def _prepare_scan(a: Tensor, b: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """Validate; return (a, b) broadcast to full shape with time at dim 0, and whether a is a matrix.

    Internal layout (time first): elementwise a, b (l, ..., n); matrix a (l, ..., n, n), b (l, ..., n, 1).
    """
    check_tensor("a", a, min_dim=2)
    check_tensor("b", b, min_dim=2)
    if state is not None:
        check_tensor("state", state, min_dim=1)
    dtype = common_dtype(a=a, b=b, state=state)
    matrix = a.dim() == b.dim() + 1
    n, l = b.shape[-1], b.shape[-2]
    if matrix:
        if a.shape[-1] != n or a.shape[-2] != n or a.shape[-3] not in (1, l):
            raise ValueError(f"a must be (..., l, n, n) matching b (..., l, n) = {shape(b)}, got {shape(a)}")
        lead = broadcast_lead(a=shape(a)[:-3], b=shape(b)[:-2])
        a = a.to(dtype).expand(*lead, l, n, n).movedim(-3, 0)  # (l, ..., n, n)
        b = b.to(dtype).expand(*lead, l, n).movedim(-2, 0)[..., None]  # (l, ..., n, 1)
    else:
        try:
            full = torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            raise ValueError(
                f"a must be (..., l, n) broadcasting with b (..., l, n) = {shape(b)}, "
                f"or (..., l, n, n); got {shape(a)}"
            ) from None
        if full[-2:] != b.shape[-2:]:
            raise ValueError(f"a {shape(a)} must not enlarge the (l, n) dims of b {shape(b)}")
        lead = full[:-2]
        a = a.to(dtype).expand(full).movedim(-2, 0)  # (l, ..., n)
        b = b.to(dtype).expand(full).movedim(-2, 0)  # (l, ..., n)
    if state is not None:
        try:
            torch.broadcast_shapes(state.shape, (*lead, n))
        except RuntimeError:
            raise ValueError(f"state must be (..., n) = {(*lead, n)}, got {shape(state)}") from None
        s = state.to(dtype).expand(*lead, n)  # (..., n)
        s = s[..., None] if matrix else s  # (..., n[, 1])
        # Fold the initial state into the first input: h_0 = a_0 ∘ h_{-1} + b_0.
        b0 = (a[0] @ s if matrix else a[0] * s) + b[0]  # (..., n[, 1])
        b = torch.cat([b0[None], b[1:]], dim=0)  # (l, ..., n[, 1])
    return a, b, matrix


def _finish_scan(h: Tensor, matrix: bool) -> Tensor:
    h = h[..., 0] if matrix else h  # (l, ..., n)
    return h.movedim(0, -2)  # (..., l, n)


def scan_sequential(a: Tensor, b: Tensor, state: Tensor | None = None) -> Tensor:
    """Slow twin of ``scan``: the loop h_t = a_t ∘ h_{t−1} + b_t, one step at a time (same arguments)."""
    a, b, matrix = _prepare_scan(a, b, state)
    h, hs = torch.zeros_like(b[0]), []
    for t in range(b.shape[0]):
        h = (a[t] @ h if matrix else a[t] * h) + b[t]  # (..., n[, 1])
        hs.append(h)
    return _finish_scan(torch.stack(hs) if hs else b, matrix)


def _combine(mul: Callable[[Tensor, Tensor], Tensor], a1, b1, a2, b2) -> tuple[Tensor, Tensor]:
    """(a1, b1) earlier, (a2, b2) later -> the composed affine map (a2 a1, a2 b1 + b2)."""
    return mul(a2, a1), mul(a2, b1) + b2


def _pscan(a: Tensor, b: Tensor, mul) -> tuple[Tensor, Tensor]:
    """Inclusive scan over dim 0 by odd-even recursion: O(l) work, 2 log2(l) sequential levels.

    Returns (A_t, H_t): A_t = a_t … a_0 and H_t = h_t with h_{−1} = 0.
    """
    l = a.shape[0]
    if l == 1:
        return a, b
    m = l // 2
    # 1. Pair up neighbours (2i, 2i+1) -> one element each: (l/2, ...)
    pa, pb = _combine(mul, a[0 : 2 * m : 2], b[0 : 2 * m : 2], a[1 : 2 * m : 2], b[1 : 2 * m : 2])
    # 2. Scan the pairs: PA[i], PB[i] is the prefix through element 2i+1.
    PA, PB = _pscan(pa, pb, mul)
    # 3. Odd positions are done; even position 2i (i >= 1) = prefix through 2i−1, then element 2i.
    k = (l - 1) // 2  # number of even positions >= 2
    ea, eb = _combine(mul, PA[:k], PB[:k], a[2::2], b[2::2])
    ea, eb = torch.cat([a[:1], ea]), torch.cat([b[:1], eb])  # (ceil(l/2), ...)
    # 4. Interleave evens and odds back into time order.
    A_out = torch.stack([ea[:m], PA], dim=1).flatten(0, 1)  # (2m, ...)
    H_out = torch.stack([eb[:m], PB], dim=1).flatten(0, 1)  # (2m, ...)
    if l % 2:
        A_out, H_out = torch.cat([A_out, ea[m:]]), torch.cat([H_out, eb[m:]])  # (l, ...)
    return A_out, H_out


def scan_parallel(a: Tensor, b: Tensor, state: Tensor | None = None) -> Tensor:
    """h_t = a_t ⊙ h_{t−1} + b_t (or a_t @ h_{t−1} + b_t) by a parallel associative scan.

    Args:
        a: (..., l, n) elementwise transitions (broadcasting with b, e.g. (..., 1, n) for a constant one),
            or (..., l, n, n) matrix transitions (l may be 1 for a constant one).
        b: (..., l, n) inputs.
        state: optional h_{−1} (..., n); zeros when None.
    Returns:
        h (..., l, n). Built from out-of-place tensor ops, so autograd differentiates through it.
    """
    a, b, matrix = _prepare_scan(a, b, state)
    if b.shape[0] == 0:
        return _finish_scan(b, matrix)
    mul = torch.matmul if matrix else torch.mul
    _, h = _pscan(a, b, mul)
    return _finish_scan(h, matrix)


scan = scan_parallel


# ----------------------------------------------------------------------------------------------------
# recurrent mode
# ----------------------------------------------------------------------------------------------------


def recurrent(
    Ab: Tensor,
    Bb: Tensor,
    C: Tensor,
    D: Tensor | None,
    u: Tensor,
    state: Tensor | None = None,
    *,
    diagonal: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the recurrence x_k = Ā x_{k−1} + B̄ u_k, y_k = C x_k + D u_k step by step.

    Args:
        Ab: Ā (..., n, n) dense or (..., n) diagonal.
        Bb: B̄ (..., n, p); or (..., n) with diagonal Ā (SISO, p = q = 1 and those axes dropped).
        C: (..., q, n); or (..., n) for SISO.
        D: (..., q, p), or (...) for SISO, or None.
        u: (..., l, p); or (..., l) for SISO.
        state: x_{−1} (..., n) or None (zeros).
        diagonal: force the dense/diagonal reading when the shapes fit both.
    Returns:
        (y (..., l, q) or (..., l), last_state x_{l−1} (..., n)); complex if any input is complex.
    """
    kind, Ab, Bb, C, D, u = _check_system(Ab, Bb, C, D, u, state, diagonal)
    a, Bu = _scan_inputs(kind, Ab, Bb, u)  # (..., 1, n[, n]), (..., l, n)
    x = scan_sequential(a, Bu, state)  # (..., l, n)
    return _readout(kind, C, D, u, x), x[..., -1, :]


def _scan_inputs(kind: str, Ab: Tensor, Bb: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """The scan's a = Ā (one time step, broadcast over l) and b_k = B̄ u_k, leading dims made equal."""
    if kind == "diag_siso":
        Bu = Bb[..., None, :] * u[..., None]  # (..., l, n)
    else:
        Bu = (Bb[..., None, :, :] @ u[..., None])[..., 0]  # (..., l, n)
    n = Ab.shape[-1]
    a_lead = Ab.shape[:-2] if kind == "dense" else Ab.shape[:-1]
    lead = torch.broadcast_shapes(a_lead, Bu.shape[:-2])
    Bu = Bu.expand(*lead, *Bu.shape[-2:])  # (..., l, n)
    if kind == "dense":
        return Ab[..., None, :, :].expand(*lead, 1, n, n), Bu  # (..., 1, n, n)
    return Ab[..., None, :].expand(*lead, 1, n), Bu  # (..., 1, n)


def _readout(kind: str, C: Tensor, D: Tensor | None, u: Tensor, x: Tensor) -> Tensor:
    """y = C x + D u over the whole sequence."""
    if kind == "diag_siso":
        y = (C[..., None, :] * x).sum(-1)  # (..., l)
        return y if D is None else y + D[..., None] * u  # (..., l)
    y = (C[..., None, :, :] @ x[..., None])[..., 0]  # (..., l, q)
    if D is not None:
        y = y + (D[..., None, :, :] @ u[..., None])[..., 0]  # (..., l, q)
    return y


def scan_system(
    Ab: Tensor,
    Bb: Tensor,
    C: Tensor,
    D: Tensor | None,
    u: Tensor,
    state: Tensor | None = None,
    *,
    diagonal: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """The same system as ``recurrent`` (same arguments and returns), computed with ``scan_parallel``."""
    kind, Ab, Bb, C, D, u = _check_system(Ab, Bb, C, D, u, state, diagonal)
    a, Bu = _scan_inputs(kind, Ab, Bb, u)  # (..., 1, n[, n]), (..., l, n)
    x = scan_parallel(a, Bu, state)  # (..., l, n)
    return _readout(kind, C, D, u, x), x[..., -1, :]


def _check_system(Ab, Bb, C, D, u, state, diagonal):
    for name, t in (("Ab", Ab), ("Bb", Bb), ("C", C), ("u", u)):
        check_tensor(name, t, min_dim=1)
    if D is not None:
        check_tensor("D", D)
    if state is not None:
        check_tensor("state", state, min_dim=1)
    dtype = common_dtype(Ab=Ab, Bb=Bb, C=C, D=D, u=u, state=state)
    kind = structure(Ab, Bb, diagonal, "Ab", "Bb")
    n = Ab.shape[-1]
    if kind == "diag_siso":
        if C.shape[-1] != n:
            raise ValueError(f"C must be (..., n) with n = {n} for a diagonal SISO system, got {shape(C)}")
        if u.dim() < 1:
            raise ValueError(f"u must be (..., l), got {shape(u)}")
        leads = dict(Ab=shape(Ab)[:-1], Bb=shape(Bb)[:-1], C=shape(C)[:-1], u=shape(u)[:-1])
        if D is not None:
            leads["D"] = shape(D)
    else:
        p = Bb.shape[-1]
        if C.dim() < 2 or C.shape[-1] != n:
            raise ValueError(f"C must be (..., q, n) with n = {n}, got {shape(C)}")
        q = C.shape[-2]
        if u.dim() < 2 or u.shape[-1] != p:
            raise ValueError(f"u must be (..., l, p) with p = {p} (from Bb {shape(Bb)}), got {shape(u)}")
        if D is not None and (D.dim() < 2 or D.shape[-2:] != (q, p)):
            raise ValueError(f"D must be (..., q, p) = (..., {q}, {p}), got {shape(D)}")
        a_lead = shape(Ab)[:-2] if kind == "dense" else shape(Ab)[:-1]
        leads = dict(Ab=a_lead, Bb=shape(Bb)[:-2], C=shape(C)[:-2], u=shape(u)[:-2])
        if D is not None:
            leads["D"] = shape(D)[:-2]
    broadcast_lead(**leads)
    if (u.shape[-1] if kind == "diag_siso" else u.shape[-2]) == 0:
        raise ValueError(f"u must have length l >= 1, got shape {shape(u)}")
    if state is not None and state.shape[-1] != n:
        raise ValueError(f"state must be (..., n) with n = {n}, got {shape(state)}")
    cast = [None if t is None else t.to(dtype) for t in (Ab, Bb, C, D, u)]
    return (kind, *cast)


# ----------------------------------------------------------------------------------------------------
# convolutional mode
# ----------------------------------------------------------------------------------------------------


def convolve(u: Tensor, K: Tensor, D: Tensor | None = None, *, siso: bool | None = None) -> Tensor:
    """Causal convolution y_k = Σ_{j=0}^{k} K_j u_{k−j} (+ D u_k), by FFT in O(l log l).

    Args:
        u: (..., l, p) MIMO, or (..., l) SISO.
        K: (..., L, q, p) MIMO, or (..., L) SISO (as returned by ``kernel``); L may differ from l (taps
            beyond l are unused, missing taps are zero).
        D: (..., q, p) MIMO, (...) SISO, or None.
        siso: force the reading. When None, shapes decide; if they fit both readings, K.dim() == u.dim() + 1
            means MIMO, anything else is an error asking for ``siso``.
    Returns:
        y (..., l, q) or (..., l), leading dims broadcast.
    """
    check_tensor("u", u, min_dim=1)
    check_tensor("K", K, min_dim=1)
    if D is not None:
        check_tensor("D", D)
    dtype = common_dtype(u=u, K=K, D=D)
    mimo_ok = K.dim() >= 3 and u.dim() >= 2 and K.shape[-1] == u.shape[-1]
    if mimo_ok:
        try:
            torch.broadcast_shapes(K.shape[:-3], u.shape[:-2])
        except RuntimeError:
            mimo_ok = False
    try:
        torch.broadcast_shapes(K.shape[:-1], u.shape[:-1])
        siso_ok = True
    except RuntimeError:
        siso_ok = False
    if siso is None:
        if mimo_ok and siso_ok and K.dim() == u.dim() + 1:
            siso_ok = False  # the standard MIMO layout: same batch dims, K has the extra q axis
        if mimo_ok and siso_ok:
            raise ValueError(
                f"u {shape(u)} with K {shape(K)} fits both SISO (u (..., l), K (..., L)) and MIMO "
                f"(u (..., l, p), K (..., L, q, p)); pass siso=True or siso=False"
            )
        siso = siso_ok
    if (siso and not siso_ok) or (not siso and not mimo_ok):
        want = "u (..., l) and K (..., L)" if siso else "u (..., l, p) and K (..., L, q, p)"
        raise ValueError(
            f"u and K must be {want} with broadcasting leading dims; got u {shape(u)}, K {shape(K)}"
        )
    if D is not None and not siso and (D.dim() < 2 or D.shape[-2:] != (K.shape[-2], K.shape[-1])):
        raise ValueError(f"D must be (..., q, p) = (..., {K.shape[-2]}, {K.shape[-1]}), got {shape(D)}")
    return convolve_fft(u.to(dtype), K.to(dtype), None if D is None else D.to(dtype), siso=siso)


def convolve_fft(u: Tensor, K: Tensor, D: Tensor | None = None, *, siso: bool) -> Tensor:
    """Fast path of ``convolve``, without validation: u, K (and D) already of one dtype and layout.

    Args and returns as ``convolve``; ``siso`` must be given. Empty inputs (any dim 0) give an empty y.
    """
    dtype = u.dtype
    l = u.shape[-1] if siso else u.shape[-2]
    t_dim_u, t_dim_k = (-1, -1) if siso else (-2, -3)
    if siso:
        out_shape = torch.broadcast_shapes(u.shape, K.shape[:-1] + (l,))  # (..., l)
    else:
        lead = torch.broadcast_shapes(u.shape[:-2], K.shape[:-3])
        out_shape = (*lead, l, K.shape[-2])  # (..., l, q)
    if 0 in out_shape or K.shape[t_dim_k] == 0 or (not siso and u.shape[-1] == 0):
        y = torch.zeros(out_shape, dtype=dtype, device=u.device)  # (..., l[, q]) no taps: K ∗ u = 0
        if D is not None and 0 not in out_shape:
            y = y + (D[..., None] * u if siso else (D[..., None, :, :] @ u[..., None])[..., 0])
        return y
    L = min(K.shape[t_dim_k], l)
    K = K.narrow(t_dim_k, 0, L)  # (..., L[, q, p])
    n_fft = 1 << max(0, (l + L - 1 - 1).bit_length()) if l > 0 else 1  # power of 2 >= l + L − 1
    if dtype.is_complex:
        Uf = torch.fft.fft(u, n=n_fft, dim=t_dim_u)  # (..., f[, p])
        Kf = torch.fft.fft(K, n=n_fft, dim=t_dim_k)  # (..., f[, q, p])
    else:
        Uf = torch.fft.rfft(u, n=n_fft, dim=t_dim_u)  # (..., f[, p])
        Kf = torch.fft.rfft(K, n=n_fft, dim=t_dim_k)  # (..., f[, q, p])
    Yf = Kf * Uf if siso else (Kf @ Uf[..., None])[..., 0]  # (..., f[, q])
    if dtype.is_complex:
        y = torch.fft.ifft(Yf, n=n_fft, dim=t_dim_u)  # (..., n_fft[, q])
    else:
        y = torch.fft.irfft(Yf, n=n_fft, dim=t_dim_u)  # (..., n_fft[, q])
    y = y.narrow(t_dim_u, 0, l)  # (..., l[, q])
    if D is not None:
        if siso:
            y = y + D[..., None] * u  # (..., l)
        else:
            y = y + (D[..., None, :, :] @ u[..., None])[..., 0]  # (..., l, q)
    return y
