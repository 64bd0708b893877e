"""The selective scan (S6) of Mamba: one public function, several backends.

Reference: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), §3.2,
Algorithm 2; the argument names and semantics are those of ``mamba_ssm.selective_scan_fn``.

Glossary (code -> paper):
    u (b, d, l)        x, the input sequence of each of the d channels
    delta (b, d, l)    Δ before the optional ``softplus(Δ + delta_bias)``
    A (d, n)           A (diagonal per channel; real, negative for stability)
    B, C               B, C: input-dependent (b, n, l), grouped (b, g, n, l) or time-invariant (d, n)
    D (d,)             the skip connection D
    z (b, d, l)        the gate branch; the output is multiplied by SiLU(z)
    h (b, d, n)        the hidden state

Recurrence (ZOH for A, Euler for B — Mamba's simplification, said out loud):
    Ā_t = exp(Δ_t A),   h_t = Ā_t ⊙ h_{t-1} + Δ_t B_t u_t,   y_t = C_t · h_t + D u_t,   out = y ⊙ SiLU(z)

Extensions beyond mamba-ssm: ``initial_state`` (b, d, n) to start from, and a ``last_state`` that
carries gradient (so chunked training and state passing are differentiable).

Part of the contract, the same on every backend (``tests/test_scan_nonfinite.py``):
    NaN and ±inf propagate exactly as in the reference loop, forward and backward: a NaN in any input
    gives NaN where the reference gives NaN (a diverging model never looks healthy), ±inf gives ±inf or
    NaN where the reference does.
    Empty sizes are not errors: b, d or n = 0, or l = 0, give the reference's result — out (b, d, l) (all
    zeros before the D and gate terms when n = 0) and last_state (b, d, n) (``initial_state`` when l = 0).

Backends (all take and return the same thing; ``reference`` is the slow twin the others are tested against):
    reference   ``scan/reference.py``: the sequential loop, exact, float32/float64.
    chunked     ``scan/chunked.py``: pure PyTorch blocked scan, any device, autograd.
    cpu         ``scan/cpu.py``: the fused C++ kernel, built at first use.
    mamba_ssm   (``auto`` on CUDA only) mamba-ssm's CUDA kernel, when installed and the call fits it.
``backend="auto"`` (overridden by ``$SSMKIT_SCAN_BACKEND``) picks by device: CPU -> ``cpu`` if it builds,
else ``chunked`` with one warning per process saying why; CUDA -> ``mamba_ssm`` if it imports and the call
has no initial state / last-state gradient / float64, else ``chunked``; any other device -> ``chunked``.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch
from torch import Tensor

from ssmkit import kernels

BACKENDS = ("auto", "reference", "chunked", "cpu")
ENV_VAR = "SSMKIT_SCAN_BACKEND"

_warned: set[str] = set()  # which "falling back" warnings were already given in this process (CUDA)


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _check_tensor(name: str, t, u: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")
    if t.device != u.device:
        raise ValueError(f"{name} must be on u's device {u.device}, got {t.device}")


def _check_shape(name: str, t: Tensor | None, expected: tuple, hint: str, u: Tensor) -> None:
    if t is None:
        return
    _check_tensor(name, t, u)
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {hint} = {tuple(expected)}, got {tuple(t.shape)}")


def validate(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """Raise ValueError naming the argument, the expected and the received shape/dtype/device."""
    if not isinstance(u, Tensor) or u.dim() != 3:
        raise ValueError(f"u must be a 3-d tensor (b, d, l), got {_shape(u)}")
    if not u.is_floating_point():
        raise ValueError(f"u must be a real floating-point tensor, got dtype {u.dtype}")
    b, d, l = u.shape
    _check_shape("delta", delta, (b, d, l), "(b, d, l)", u)
    _check_tensor("A", A, u)
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape (d, n) with d = {d}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        _check_tensor(name, M, u)
        if M.dim() == 2:
            _check_shape(name, M, (d, n), "(d, n) [time-invariant]", u)
        elif M.dim() == 3:
            _check_shape(name, M, (b, n, l), "(b, n, l)", u)
        elif M.dim() == 4:
            g = M.shape[1]
            if M.shape[0] != b or M.shape[2] != n or M.shape[3] != l or g == 0 or d % g != 0:
                raise ValueError(
                    f"{name} must have shape (b, g, n, l) = ({b}, g, {n}, {l}) with g dividing d = {d}, "
                    f"got {tuple(M.shape)}"
                )
        else:
            raise ValueError(
                f"{name} must have shape (d, n) = {(d, n)}, (b, n, l) = {(b, n, l)} or (b, g, n, l), "
                f"got {tuple(M.shape)}"
            )
    _check_shape("D", D, (d,), "(d,)", u)
    _check_shape("z", z, (b, d, l), "(b, d, l)", u)
    _check_shape("delta_bias", delta_bias, (d,), "(d,)", u)
    _check_shape("initial_state", initial_state, (b, d, n), "(b, d, n)", u)


@functools.cache
def _cpu_unavailable_reason() -> str | None:
    """None when the fused C++ ``cpu`` backend can run here, else why not (asked once per process)."""
    try:
        cpu = importlib.import_module("ssmkit.scan.cpu")
    except ModuleNotFoundError as e:
        if e.name == "ssmkit.scan.cpu":
            return "ssmkit.scan.cpu not built"
        return f"importing ssmkit.scan.cpu failed: {e}"
    except ImportError as e:
        return f"importing ssmkit.scan.cpu failed: {e}"
    return cpu.unavailable_reason()


@functools.cache
def _mamba_ssm_scan():
    """mamba-ssm's CUDA ``selective_scan_fn`` when the package imports, else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _mamba_ssm_compatible(u, A, D, delta_bias, initial_state, last_state_grad: bool) -> bool:
    """Whether mamba-ssm's Mamba-1 CUDA kernel computes this call exactly as our contract says.

    It has no initial state, ignores a gradient on the last state, takes u in float32/float16/bfloat16
    and A, D, delta_bias in float32 only.
    """
    return (
        initial_state is None
        and not last_state_grad
        and u.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(t is None or t.dtype == torch.float32 for t in (A, D, delta_bias))
    )


def _auto_backend(device_type: str, dtype: torch.dtype, mamba_compatible: bool) -> str:
    """The choice of ``backend="auto"``: "cpu" | "chunked" | "mamba_ssm" (CUDA only).

    CPU tensors: the fused ``cpu`` kernel when it builds, else ``chunked`` with one warning per process;
    float64 always goes to ``chunked`` (the fused kernel computes in float32 by design).
    CUDA tensors: mamba-ssm's kernel when the package imports and the call is ``mamba_compatible``, else
    ``chunked`` (one warning per process when mamba-ssm is missing). Other devices: ``chunked``.
    """
    if device_type == "cpu":
        if dtype == torch.float64:
            return "chunked"
        reason = _cpu_unavailable_reason()
        if reason is None:
            return "cpu"
        kernels.warn_fallback(
            kernels.SCAN,
            f"the 'chunked' selective-scan backend (set {ENV_VAR}=chunked to choose it explicitly)",
            stacklevel=5,
            why=reason,
        )
        return "chunked"
    if device_type == "cuda":
        if _mamba_ssm_scan() is None:
            _warn_once(
                "cuda",
                "ssmkit.selective_scan: mamba_ssm is not installed; using the pure-PyTorch 'chunked' backend "
                "on CUDA (install mamba-ssm for its fused kernel).",
            )
            return "chunked"
        return "mamba_ssm" if mamba_compatible else "chunked"
    return "chunked"


def resolve_backend(backend: str, u: Tensor, mamba_compatible: bool = False) -> str:
    """The backend a call runs on: "reference" | "chunked" | "cpu" | "mamba_ssm".

    ``backend="auto"`` is replaced by ``$SSMKIT_SCAN_BACKEND`` when that is set, then chosen by device (see
    ``_auto_backend``). An explicit backend is used as asked, or fails with the reason it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _auto_backend(u.device.type, u.dtype, mamba_compatible)
    if backend == "cpu":
        if u.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got u on {u.device}")
        reason = _cpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"selective_scan backend 'cpu' is unavailable: {reason}")
    return backend


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    backend: str = "auto",
):
    """Selective scan, mamba-ssm's ``selective_scan_fn`` semantics plus ``initial_state``.

    Args:
        u: (b, d, l) input.  delta: (b, d, l) Δ (before bias/softplus).  A: (d, n) real.
        B, C: (b, n, l) | (b, g, n, l) grouped | (d, n) time-invariant.
        D: (d,) skip.  z: (b, d, l) gate.  delta_bias: (d,) added to Δ before softplus.
        delta_softplus: apply softplus to Δ + delta_bias.
        return_last_state: also return the final state h_l (b, d, n), differentiable.
        initial_state: (b, d, n) h_0 (default zeros).
        backend: "auto" | "reference" | "chunked" | "cpu"; env ``SSMKIT_SCAN_BACKEND`` overrides "auto".
            "auto" picks ``cpu`` for CPU tensors when the fused kernel builds (else ``chunked``, with one
            warning per process saying why); on CUDA, mamba-ssm's kernel when it is installed and the call
            needs nothing it lacks (no ``initial_state``, no gradient through the last state, float32 A),
            else ``chunked``.
    Returns:
        out (b, d, l) in u's dtype, or (out, last_state (b, d, n) float32/float64).
    """
    validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    last_state_grad = (
        return_last_state
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in inputs)
    )
    compatible = _mamba_ssm_compatible(u, A, D, delta_bias, initial_state, last_state_grad)
    name = resolve_backend(backend, u, compatible)
    if u.numel() == 0 or A.numel() == 0:  # b, d, l or n = 0: every backend gives the reference's answer
        name = "reference"
    if name == "mamba_ssm":
        return _mamba_ssm_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "reference":
        from ssmkit.scan.reference import selective_scan_reference as fn
    elif name == "chunked":
        from ssmkit.scan.chunked import selective_scan_chunked as fn
    else:
        from ssmkit.scan.cpu import selective_scan_cpu as fn
    out, last = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (out, last) if return_last_state else out
