"""Causal depthwise conv1d followed by SiLU, with a hand-written backward (the Mamba mixer's short conv).

Reference: Gu & Dao 2023 (arXiv 2312.00752) §3.4, Fig. 3 — the width-K causal depthwise convolution that
precedes the selective scan; mamba-ssm computes it with ``causal_conv1d_fn(..., activation="silu")``.

For each channel c of x (b, d, l), with the K − 1 inputs before the sequence taken from ``history``
(zeros for a fresh sequence):

    xp    = [history, x]                                   (b, d, l + K − 1)
    a_t   = bias_c + Σ_k w_{c,k} · xp_{c, t+k}             k = 0..K−1 (w_{c,K−1} multiplies x_t itself)
    y_t   = SiLU(a_t) = a_t · σ(a_t)

Backward, with g = ∂L/∂y and g' = g · SiLU'(a):
    ∂L/∂xp_{c,s}  = Σ_k w_{c,k} · g'_{c, s−k}
    ∂L/∂w_{c,k}   = Σ_{b,t} g'_{c,t} · xp_{c,t+k}
    ∂L/∂bias_c    = Σ_{b,t} g'_{c,t}

Why not ``F.conv1d``: on CPU, PyTorch's depthwise ``convolution_backward`` for the mixer's shape (d = 1536
channels, width 4, l = 2048, the input a transposed view of in_proj's output) took ≈ 3.3 s per layer in
our whole-model profile (benchmarks/bench_model.py), more than all the layer's matmuls together.

Two implementations, one contract:
  * float32 on the CPU: a C++ kernel (``csrc/causal_conv1d_cpu.cpp``, built at first use by
    ``ssmkit.kernels``, cached and locked like the fused scan; ``SSMKIT_NO_CPU_EXT=1`` disables it).
    One pass per row forward; the backward recomputes a from x, so only the inputs are saved.
  * any other dtype/device, or when the kernel cannot be built (one warning): a ``torch.autograd.Function``
    in pure PyTorch — K contiguous elementwise passes over (b, d, l), the pre-activation saved.
The slow twin is :func:`causal_conv1d_silu_reference` (``F.conv1d`` on the padded input, then SiLU).

Glossary: x the mixer's conv branch (b, d, l); K = d_conv the width; w = conv1d.weight[:, 0, :] (d, K);
history the last K − 1 inputs before x (b, d, K − 1); a the pre-activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmkit import kernels

_ext = None  # the loaded C++ module


def causal_conv1d_silu_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, history: Tensor | None = None
) -> Tensor:
    """Slow twin: ``SiLU(F.conv1d([history, x], weight, bias, groups=d))``. Shapes as the fast path."""
    b, d, _ = x.shape
    K = weight.shape[-1]
    if history is None:
        history = x.new_zeros(b, d, K - 1)
    xp = torch.cat([history.to(x.dtype), x], dim=-1)  # (b, d, l + K − 1)
    return F.silu(F.conv1d(xp, weight.reshape(d, 1, K), bias, groups=d))  # (b, d, l)


def unavailable_reason() -> str | None:
    """Load (or, the first time on this machine, build) the C++ kernel through ``ssmkit.kernels``; None when
    usable, else a one-line reason. ``SSMKIT_NO_CPU_EXT=1`` simulates a machine without a compiler."""
    global _ext
    _ext = kernels.load(kernels.CONV)  # the module, cached by the loader (a dict lookup)
    return None if _ext is not None else kernels.reason(kernels.CONV)


def _use_cpp(x: Tensor) -> bool:
    """float32 CPU tensors go to the C++ kernel when it builds (else one warning, then pure PyTorch)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if unavailable_reason() is None:
        return True
    kernels.warn_fallback(kernels.CONV, "the pure-PyTorch causal conv1d", stacklevel=4)
    return False


class _CausalConv1dSiLUCPU(torch.autograd.Function):
    """The C++ kernel (csrc/causal_conv1d_cpu.cpp): saves only its inputs, recomputes a in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, history: Tensor | None):
        if x.stride(2) != 1:  # unit time stride (.contiguous() would keep a (1, d, 1) view as it is)
            x = x.clone(memory_format=torch.contiguous_format)  # (b, d, l)
        weight = weight.contiguous()  # (d, K)
        empty = x.new_empty(0)
        bias_ = empty if bias is None else bias.contiguous()  # (d,)
        hist_ = empty if history is None else history.contiguous()  # (b, d, K − 1)
        ctx.save_for_backward(x, weight, bias_, hist_)
        ctx.has = (bias is not None, history is not None)
        return _ext.fwd(x, weight, bias_, hist_)  # (b, d, l)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, bias_, hist_ = ctx.saved_tensors
        dx, dw, db, dh = _ext.bwd(x, weight, bias_, hist_, grad_y.contiguous())
        has_bias, has_hist = ctx.has
        return dx, dw, db if has_bias else None, dh if has_hist else None


class _CausalConv1dSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, history: Tensor | None):
        b, d, l = x.shape
        K = weight.shape[1]
        if history is None:
            xp = x.new_zeros(b, d, l + K - 1)  # (b, d, l + K − 1)
            xp[:, :, K - 1 :] = x
        else:
            xp = torch.cat([history, x], dim=-1)  # (b, d, l + K − 1)
        w = weight[:, :, None]  # (d, K, 1)
        a = xp[:, :, K - 1 :] * w[:, K - 1]  # (b, d, l)
        if bias is not None:
            a += bias[:, None]
        for k in range(K - 1):
            a.addcmul_(xp[:, :, k : k + l], w[:, k])  # (b, d, l)
        ctx.save_for_backward(xp, weight, a)
        ctx.has_bias = bias is not None
        ctx.has_history = history is not None
        return F.silu(a)  # (b, d, l)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xp, weight, a = ctx.saved_tensors
        l = a.shape[-1]
        K = weight.shape[1]
        g = torch.ops.aten.silu_backward(grad_y.contiguous(), a)  # (b, d, l)  g' = g · SiLU'(a)
        w = weight[:, :, None]  # (d, K, 1)
        grad_w = grad_b = grad_x = grad_h = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            dxp = g.new_zeros(xp.shape)  # (b, d, l + K − 1)
            for k in range(K):
                dxp[:, :, k : k + l].addcmul_(g, w[:, k])
            grad_x = dxp[:, :, K - 1 :] if ctx.needs_input_grad[0] else None  # (b, d, l)
            grad_h = dxp[:, :, : K - 1] if ctx.has_history and ctx.needs_input_grad[3] else None
        if ctx.needs_input_grad[1]:
            cols = [torch.einsum("bdl,bdl->d", g, xp[:, :, k : k + l]) for k in range(K)]  # K × (d,)
            grad_w = torch.stack(cols, dim=1)  # (d, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=(0, 2))  # (d,)
        return grad_x, grad_w, grad_b, grad_h


def causal_conv1d_silu(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, history: Tensor | None = None
) -> Tensor:
    """SiLU(causal depthwise conv1d(x)), differentiable in every input.

    Args:
        x: (b, d, l) input, l >= 1.
        weight: (d, K) or conv1d's (d, 1, K) filter taps; tap K − 1 multiplies the current input.
        bias: optional (d,).
        history: optional (b, d, K − 1), the inputs just before x (default zeros).
    Returns:
        (b, d, l) in x's dtype.
    """
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"x must be a (b, d, l) tensor with l >= 1, got {getattr(x, 'shape', type(x))}")
    b, d, _ = x.shape
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]  # (d, K)
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(
            f"weight must have shape (d, K) or (d, 1, K) with d = {d}, got {tuple(weight.shape)}"
        )
    K = weight.shape[1]
    if K < 1:
        raise ValueError(f"weight must have K >= 1 taps, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias must have shape (d,) = ({d},), got {tuple(bias.shape)}")
    if history is not None and tuple(history.shape) != (b, d, K - 1):
        raise ValueError(
            f"history must have shape (b, d, K - 1) = {(b, d, K - 1)}, got {tuple(history.shape)}"
        )
    dtype = x.dtype
    for name, t in (("weight", weight), ("bias", bias), ("history", history)):
        if t is not None and (t.dtype != dtype or t.device != x.device):
            raise ValueError(
                f"{name} must have x's dtype {dtype} and device {x.device}, got {t.dtype} on {t.device}"
            )
    if _use_cpp(x):
        return _CausalConv1dSiLUCPU.apply(x, weight, bias, history)
    return _CausalConv1dSiLU.apply(x, weight, bias, history)


__all__ = ["causal_conv1d_silu", "causal_conv1d_silu_reference", "unavailable_reason"]
