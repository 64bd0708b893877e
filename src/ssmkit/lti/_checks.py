"""Input validation shared by the ``ssmkit.lti`` functions (private).

Every error is a ``ValueError`` that names the argument and gives the expected and the received
shape, dtype or value. Non-finite inputs are rejected: the math below never produces useful output
from them, and a NaN that surfaces 1000 steps later is much harder to trace.
"""

from __future__ import annotations

import torch
from torch import Tensor

REAL_DTYPES = (torch.float32, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
_PRECISION = {
    torch.float32: "single",
    torch.complex64: "single",
    torch.float64: "double",
    torch.complex128: "double",
}


def shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(name: str, t: object, *, allow_complex: bool = True, min_dim: int = 0) -> Tensor:
    """A floating tensor (float32/float64, or complex64/complex128 when allowed), finite, >= min_dim dims."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = REAL_DTYPES + (COMPLEX_DTYPES if allow_complex else ())
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must have dtype in ({names}), got {t.dtype} with shape {shape(t)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {shape(t)}")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} must be finite, got {bad} non-finite entries (shape {shape(t)})")
    return t


def common_dtype(**tensors: Tensor | None) -> torch.dtype:
    """The dtype the computation runs in: same precision for all, complex if any is complex.

    Mixing single and double precision is an error rather than a silent promotion.
    """
    present = {k: v for k, v in tensors.items() if v is not None}
    precisions = {_PRECISION[v.dtype] for v in present.values()}
    if len(precisions) > 1:
        got = ", ".join(f"{k}: {v.dtype}" for k, v in present.items())
        raise ValueError(
            f"all inputs must share one precision (float32/complex64 or float64/complex128); got {got}"
        )
    double = precisions == {"double"}
    is_complex = any(v.is_complex() for v in present.values())
    if is_complex:
        return torch.complex128 if double else torch.complex64
    return torch.float64 if double else torch.float32


def broadcast_lead(**leads: tuple[int, ...]) -> tuple[int, ...]:
    """Broadcast leading (batch) shapes; the error names every argument and its leading shape."""
    try:
        return tuple(torch.broadcast_shapes(*leads.values()))
    except RuntimeError:
        got = ", ".join(f"{k} leading dims {v}" for k, v in leads.items())
        raise ValueError(f"leading (batch) dims must broadcast; got {got}") from None


def structure(Ab: Tensor, Bb: Tensor, diagonal: bool | None, a_name: str = "A", b_name: str = "B") -> str:
    """Classify a state-space pair as ``"dense"``, ``"diag"`` (diagonal, MIMO) or ``"diag_siso"``.

    dense:      A (..., n, n), B (..., n, p)
    diag:       A (..., n),    B (..., n, p)          (B has one more dim than A)
    diag_siso:  A (..., n),    B (..., n)             (same number of dims, p = 1)

    A (n, n) with B (n, n) fits both dense and diag_siso; then ``diagonal`` must be given.
    """
    n_last = Ab.shape[-1] if Ab.dim() else 0
    dense_ok = (
        Ab.dim() >= 2 and Ab.shape[-1] == Ab.shape[-2] and Bb.dim() == Ab.dim() and Bb.shape[-2] == n_last
    )
    diag_mimo_ok = Ab.dim() >= 1 and Bb.dim() == Ab.dim() + 1 and Bb.shape[-2] == n_last
    diag_siso_ok = Ab.dim() >= 1 and Bb.dim() == Ab.dim() and Bb.shape[-1] == n_last
    if diagonal is None:
        if dense_ok and diag_siso_ok:
            raise ValueError(
                f"{a_name} {shape(Ab)} with {b_name} {shape(Bb)} is ambiguous: dense A (..., n, n) with "
                f"B (..., n, p) or diagonal A (..., n) with B (..., n); pass diagonal=True or diagonal=False"
            )
        if dense_ok:
            return "dense"
        if diag_mimo_ok:
            return "diag"
        if diag_siso_ok:
            return "diag_siso"
    elif not diagonal and dense_ok:
        return "dense"
    elif diagonal and diag_mimo_ok:
        return "diag"
    elif diagonal and diag_siso_ok:
        return "diag_siso"
    want = {
        None: "dense A (..., n, n) with B (..., n, p), or diagonal A (..., n) with B (..., n, p) or (..., n)",
        False: "dense A (..., n, n) with B (..., n, p)",
        True: "diagonal A (..., n) with B (..., n, p) or (..., n)",
    }[diagonal]
    raise ValueError(f"{a_name} and {b_name} must be {want}; got {a_name} {shape(Ab)}, {b_name} {shape(Bb)}")
