"""RMSNorm: root-mean-square layer normalisation (Zhang & Sennrich 2019, arXiv 1910.07467, eq. 4).

    y = x / sqrt(mean(x², last dim) + eps) ⊙ weight

The pre-norm of every Mamba block and the final ``norm_f`` (mamba-ssm ``RMSNorm``, transformers
``MambaRMSNorm``). Statistics are computed in float32 (float64 for float64 inputs); the normalised value is
cast back to the input dtype before the weight multiplies it (transformers' order, so float32 results are
bit-for-bit those of ``MambaRMSNorm``). No bias, no mean subtraction.

Glossary: ``weight`` (d,) the learned gain g; ``eps`` the ε under the square root.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Functional RMSNorm over the last dimension. ``x (..., d)``, ``weight (d,)`` -> ``(..., d)``."""
    xf = x if x.dtype == torch.float64 else x.float()  # (..., d) float32 (float64 stays float64)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., d)
    return weight * normed.to(x.dtype)  # (..., d)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned gain (initialised to ones).

    Args:
        d_model: size of the normalised (last) dimension.
        eps: added to the mean square before the square root (mamba-ssm default 1e-5).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))  # (d,)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(
                f"x must have last dimension d_model = {self.weight.shape[0]}, got shape {tuple(x.shape)}"
            )
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
