"""The gated MLP of hybrid Mamba blocks (mamba-ssm's ``GatedMLP``, a SwiGLU: Shazeer 2020, arXiv 2002.05202).

    y = fc2( a ⊙ SiLU(g) ),   [a, g] = fc1(x)      fc1: d -> 2f, fc2: f -> d, no biases

The hidden width f is ``d_intermediate`` rounded up to a multiple of ``multiple_of`` (128, as mamba-ssm),
so a config's ``d_intermediate`` gives exactly mamba-ssm's shapes. Names ``fc1`` / ``fc2`` are mamba-ssm's.

Glossary: d d_model; f the hidden width; a, g the two halves of fc1's output.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def gated_mlp_width(d_intermediate: int, multiple_of: int = 128) -> int:
    """The hidden width f mamba-ssm's GatedMLP uses for ``hidden_features=d_intermediate``."""
    return (d_intermediate + multiple_of - 1) // multiple_of * multiple_of


class GatedMLP(nn.Module):
    """y = fc2(a ⊙ SiLU(g)) with [a, g] = fc1(x); (..., d) -> (..., d)."""

    def __init__(self, d_model: int, d_intermediate: int, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        if not isinstance(d_intermediate, int) or d_intermediate <= 0:
            raise ValueError(f"d_intermediate must be a positive int, got {d_intermediate!r}")
        f = gated_mlp_width(d_intermediate, multiple_of)
        self.fc1 = nn.Linear(d_model, 2 * f, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(f, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.fc1(x).chunk(2, dim=-1)  # (..., f) ×2
        return self.fc2(a * F.silu(g))  # (..., d)
