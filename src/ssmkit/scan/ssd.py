"""SSD, the state space operator of Mamba-2: one public function, several backends, and a decode step.

Reference: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (2024, arXiv 2405.21060), §3 (SSMs with scalar A per head) and §6 (the
chunked algorithm). Argument names and semantics are those of mamba-ssm's ``mamba_chunk_scan_combined``
(``ssd``) and ``selective_state_update`` with heads and groups (``ssd_step``).

Glossary (code -> paper):
    x (b, l, h, p)        x, the input: h heads of p channels ("headdim")
    dt (b, l, h)          Δ before the optional bias, softplus and limits (one step size per head)
    A (h,)                A, a real scalar per head (negative for a decaying state)
    B, C (b, l, g, n)     B, C, input-dependent, shared by the h / g heads of each of g groups
                          (head i uses group i // (h / g)); n is the state size
    D (h,) or (h, p)      the skip connection D
    z (b, l, h, p)        optional gate: the output is multiplied by SiLU(z)
    h (b, h, p, n)        the state, one (p, n) matrix per head ("initial_states", "final_states")
    seq_idx (b, l)        integer sequence ids of packed sequences

Semantics, per head and step (zero-order hold for A, Euler for B — as Mamba):
    Δ_t = dt_t (+ dt_bias), then softplus(Δ_t) if ``dt_softplus``, then clamped to ``dt_limit`` (only when
          it is not the default (0, ∞), as mamba-ssm does — so a negative Δ without softplus is kept)
    h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t ⊗ B_t,   y_t = C_t · h_t + D x_t,   y_t ← y_t · SiLU(z_t) with z
    A change of seq_idx between t − 1 and t resets the state (h_{t−1} := 0); ``initial_states`` seeds h_{−1}.
Accumulation and the states are float32 (float64 for float64 x); y comes back in x's dtype. Every input,
``initial_states`` included, gets a gradient, and so does a loss on the final state.
Empty sizes (b, l, h, p or n = 0) are not errors: they give the reference's result (an empty y, zeros
before the D and gate terms when n = 0, and ``initial_states`` (or zeros) as the final state when l = 0).

Backends (all compute the same thing; ``reference`` is the slow twin the others are tested against):
    reference   ``scan/ssd_reference.py``: the sequential loop over l, exact, float32/float64.
    chunked     ``scan/ssd_chunked.py``: the SSD block decomposition in batched matmuls, any device.
    mamba_ssm   (``auto`` on CUDA only) mamba-ssm's Triton ``mamba_chunk_scan_combined`` when installed.
``backend="auto"`` (overridden by ``$SSMKIT_SSD_BACKEND``): ``chunked``, except on CUDA when mamba-ssm
imports and the call is not float64 (without mamba-ssm on CUDA: ``chunked``, with one warning per process).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmkit.scan.ssd_chunked import ssd_chunked
from ssmkit.scan.ssd_reference import ssd_reference

BACKENDS = ("auto", "reference", "chunked")
ENV_VAR = "SSMKIT_SSD_BACKEND"
DEFAULT_DT_LIMIT = (0.0, math.inf)

_warned: list = []  # non-empty once the "no mamba-ssm on CUDA" warning was given in this process


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _check(name: str, t, expected: tuple, hint: str, x: Tensor, floating: bool = True) -> None:
    """ValueError unless ``t`` (skipped when None) is a tensor on x's device with shape ``expected``."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {hint}, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {hint} = {tuple(expected)}, got {tuple(t.shape)}")


def _check_dt_limit(dt_limit) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair (min, max) of numbers, got {dt_limit!r}") from None
    if not lo <= hi:
        raise ValueError(f"dt_limit must have min <= max, got {dt_limit!r}")
    return lo, hi


def _check_groups(B: Tensor, h: int, lead: tuple, hint: str, x: Tensor) -> tuple[int, int]:
    """(g, n) of B, checking B's shape lead + (g, n) with g >= 1 dividing h."""
    if not isinstance(B, Tensor) or B.dim() != len(lead) + 2 or tuple(B.shape[: len(lead)]) != lead:
        raise ValueError(f"B must have shape {hint} with leading dims {lead}, got {_shape(B)}")
    g, n = B.shape[-2], B.shape[-1]
    if g < 1 or h % g != 0:
        raise ValueError(f"B's group count g = {g} must be >= 1 and divide the number of heads h = {h}")
    _check("B", B, lead + (g, n), hint, x)
    return g, n


def _check_D(D, h: int, p: int, x: Tensor) -> None:
    if D is not None and not (isinstance(D, Tensor) and D.dim() == 2):
        _check("D", D, (h,), "(h,) or (h, p)", x)
    else:
        _check("D", D, (h, p), "(h,) or (h, p)", x)


def validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx) -> None:
    """Raise ValueError naming the argument, the expected and the received shape / dtype / device."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-d tensor (b, l, h, p), got {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a real floating-point tensor, got dtype {x.dtype}")
    b, l, h, p = x.shape
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check("dt", dt, (b, l, h), "(b, l, h)", x)
    if dt is None:
        raise ValueError("dt must be a tensor of shape (b, l, h), got None")
    _check("A", A, (h,), "(h,)", x)
    if A is None:
        raise ValueError("A must be a tensor of shape (h,), got None")
    g, n = _check_groups(B, h, (b, l), "(b, l, g, n)", x)
    _check("C", C, (b, l, g, n), "(b, l, g, n) like B", x)
    if C is None:
        raise ValueError("C must be a tensor of shape (b, l, g, n), got None")
    _check_D(D, h, p, x)
    _check("z", z, (b, l, h, p), "(b, l, h, p)", x)
    _check("dt_bias", dt_bias, (h,), "(h,)", x)
    _check("initial_states", initial_states, (b, h, p, n), "(b, h, p, n)", x)
    _check("seq_idx", seq_idx, (b, l), "(b, l)", x, floating=False)
    if seq_idx is not None and (seq_idx.is_floating_point() or seq_idx.is_complex()):
        raise ValueError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    _check_dt_limit(dt_limit)


def process_dt(
    dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float], acc: torch.dtype
) -> Tensor:
    """Δ = dt (+ dt_bias), softplus if asked (PyTorch's, linear above 20 — as mamba-ssm's kernel), then
    clamped to ``dt_limit`` unless that is the default (0, ∞). Computed in ``acc`` (float32 / float64)."""
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = _check_dt_limit(dt_limit)
    if (lo, hi) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _float32_math(x: Tensor):
    """A context without autocast on x's device: under ``torch.autocast(bfloat16)`` (bf16 training) the
    matmuls here would otherwise run in bf16, and the state and accumulation must stay float32."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


@functools.cache
def _mamba_ssm_ssd():
    """mamba-ssm's Triton ``mamba_chunk_scan_combined`` when the package imports, else None."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend a call runs on: "reference" | "chunked" | "mamba_ssm".

    ``"auto"`` is replaced by ``$SSMKIT_SSD_BACKEND`` when that is set; ``auto`` then picks mamba-ssm's
    Triton kernel for CUDA tensors (not float64) when mamba-ssm imports, else ``chunked``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    return backend if backend != "auto" else _auto_backend(x.device.type, x.dtype)


def _auto_backend(device_type: str, dtype: torch.dtype) -> str:
    """``auto``'s choice: mamba-ssm's kernel for CUDA (not float64) when it imports — one warning per process
    when it does not — else ``chunked``."""
    if device_type != "cuda" or dtype == torch.float64:
        return "chunked"
    if _mamba_ssm_ssd() is None:
        if not _warned:
            _warned.append(True)
            warnings.warn(
                "ssmkit.ssd: mamba_ssm is not installed; using the pure-PyTorch 'chunked' backend on CUDA "
                "(install mamba-ssm for its Triton kernel).",
                RuntimeWarning,
                stacklevel=4,
            )
        return "chunked"
    return "mamba_ssm"


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 256,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
    backend: str = "auto",
):
    """The SSD operator (Mamba-2's scan), with ``mamba_chunk_scan_combined``'s names and semantics.

    Args:
        x: (b, l, h, p) input.  dt: (b, l, h) Δ before bias / softplus / limits.  A: (h,) real.
        B, C: (b, l, g, n), g dividing h.  chunk_size: chunk length L of the block decomposition (the
            result does not depend on it beyond rounding). On a CPU the ``chunked`` backend uses at most
            ``cpu_chunk_size(p, n)`` (16–128): mamba-ssm's 256 suits its GPU kernel and is up to 14×
            slower here (``benchmarks/bench_ssd.py``).  D: (h,) or (h, p) skip.  z: (b, l, h, p) gate.
        dt_bias: (h,) added to dt.  dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: (min, max) clamp of Δ (default (0, ∞): no clamp).
        initial_states: (b, h, p, n) state before the first step (default zeros), differentiable.
        seq_idx: (b, l) integer ids of packed sequences; the state resets where the id changes.
        return_final_states: also return the state after the last step (differentiable).
        backend: "auto" | "reference" | "chunked"; ``$SSMKIT_SSD_BACKEND`` overrides "auto".
    Returns:
        y (b, l, h, p) in x's dtype, or (y, final_states (b, h, p, n) float32 / float64 for float64 x).
    """
    validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx)
    name = resolve_backend(backend, x)
    if x.numel() == 0 or B.shape[-1] == 0:  # empty sizes: every backend gives the reference's answer
        name = "reference"
    if name == "mamba_ssm":
        kwargs = {} if tuple(dt_limit) == DEFAULT_DT_LIMIT else {"dt_limit": tuple(dt_limit)}
        return _mamba_ssm_ssd()(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            seq_idx=seq_idx, dt_softplus=dt_softplus, return_final_states=return_final_states, **kwargs,
        )  # fmt: skip
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, acc)  # (b, l, h)
    with _float32_math(x):
        if name == "reference":
            y, final = ssd_reference(x, delta, A, B, C, D, z, initial_states, seq_idx)
        else:
            L = chunk_size
            if x.device.type == "cpu":
                L = min(chunk_size, cpu_chunk_size(x.shape[-1], B.shape[-1]))
            y, final = ssd_chunked(x, delta, A, B, C, L, D, z, initial_states, seq_idx)
    return (y, final) if return_final_states else y


def cpu_chunk_size(p: int, n: int) -> int:
    """The chunk length at which the ``chunked`` backend runs fastest on a CPU for head size p and state
    size n: the power of two nearest √(p·n), within [16, 128]. Step 1's work per position grows with L
    (one (L, L) decay matrix per head), the state passing's shrinks with it (a (p, n) state per head and
    chunk), so the two balance near L² ≈ p·n. Measured forward+backward on a 2-core EPYC (Zen 4): at
    p = n = 16 (the ablation models), L = 16 is 14× faster than mamba-ssm's 256 and within 10 % of the
    best; at the mamba2-130m shape (p = 64, n = 128), L = 64 is within 1 % of the best and 1.3× faster
    forward than 256."""
    return 1 << min(7, max(4, round(math.log2(max(p * n, 1)) / 2)))


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
) -> tuple[Tensor, Tensor]:
    """One SSD step for decoding (mamba-ssm's ``selective_state_update`` with heads and groups), functional.

    h ← exp(Δ A) h + Δ x ⊗ B, y = C · h + D x (· SiLU(z)), with Δ processed as in :func:`ssd` —
    ``dt_limit`` included (mamba-ssm's decode step ignores it; here prefill and decode agree).

    Args:
        state: (b, h, p, n) the state before this token (not modified).  x: (b, h, p).  dt: (b, h).
        A: (h,).  B, C: (b, g, n).  D: (h,) or (h, p).  z: (b, h, p).  dt_bias: (h,).
    Returns:
        y (b, h, p) in x's dtype and the new state (b, h, p, n) float32 (float64 if x or state is float64).
    """
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of shape (b, h, p), got {_shape(x)}")
    b, h, p = x.shape
    _check("dt", dt, (b, h), "(b, h)", x)
    _check("A", A, (h,), "(h,)", x)
    if dt is None or A is None:
        raise ValueError("dt (b, h) and A (h,) are required, got None")
    g, n = _check_groups(B, h, (b,), "(b, g, n)", x)
    _check("C", C, (b, g, n), "(b, g, n) like B", x)
    if C is None:
        raise ValueError("C must be a tensor of shape (b, g, n), got None")
    _check("state", state, (b, h, p, n), "(b, h, p, n)", x)
    if state is None:
        raise ValueError("state must be a tensor of shape (b, h, p, n), got None")
    _check_D(D, h, p, x)
    _check("z", z, (b, h, p), "(b, h, p)", x)
    _check("dt_bias", dt_bias, (h,), "(h,)", x)
    with _float32_math(x):
        return _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, g)


def _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, g) -> tuple[Tensor, Tensor]:
    """``ssd_step`` after validation. Shapes as there."""
    b, h, p = x.shape
    n = B.shape[-1]
    acc = torch.float64 if torch.float64 in (x.dtype, state.dtype) else torch.float32
    r = h // g
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, acc)  # (b, h)
    xf = x.to(acc)  # (b, h, p)
    dA = torch.exp(delta * A.to(acc))  # (b, h)
    X = (xf * delta[..., None]).view(b, g, r * p, 1)  # (b, g, r·p, 1): Δ x
    decayed = state.to(acc) * dA[..., None, None]  # (b, h, p, n)
    new = torch.addcmul(decayed.view(b, g, r * p, n), X, B.to(acc)[:, :, None, :])  # (b, g, r·p, n)
    y = (new @ C.to(acc)[..., None]).view(b, h, p)  # (b, h, p)
    if D is not None:
        Df = D.to(acc)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)  # (b, h, p)
    if z is not None:
        y = y * F.silu(z.to(acc))  # (b, h, p)
    return y.to(x.dtype), new.view(b, h, p, n)
